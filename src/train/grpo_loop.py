"""The GRPO loop (`rl.algorithm=grpo`, `stage=grpo`): the training loop of moetron.train.loop with
a rollout in place of token data. One step:

1. `forward_backward`: this step's prompts (moetron.rl.prompts; data rank r of n samples its P / n),
   G completions each sampled with the policy's weights (moetron.rl.rollout; experts' routes
   recorded), scored by the reward functions, group advantages; the reference model's
   log-probabilities (rl.beta > 0); then `rl.inner_steps` passes over the rollout, each an
   optimizer step (the last one is the loop's own `apply_gradients`; each one counts as a step
   of the parameter average, train.ema_decay, and in train/skipped_steps);
2. - 5. as for token data: gradients, metrics summed over all ranks (with the rewards and the
   experts' loads while sampling), the logged values, checkpoints.

Checkpoints fall between steps, so a rollout is never saved half-used: the next step's rollout is a
function of the checkpoint's weights, `train.seed` and the step (each completion draws from a
generator of its own, seeded by the seed, the step and its index in the global batch), and a
resumed run samples, scores and trains exactly as the uninterrupted one; the same holds in any
layout up to the rounding of the sampler's forwards.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from moetron.data.chat import ChatError, ChatTemplate
from moetron.models.common.moe_step import routers
from moetron.rl.prompts import load_prompts, step_prompts
from moetron.rl.rewards import RewardError, load_reward, score
from moetron.rl.rollout import Rollout, RolloutSettings, rollout
from moetron.train.grpo_micro_batches import GRPO_SUMS, micro_rows
from moetron.train.loop import StepInput, TrainingLoop, comm_metrics
from moetron.train.lr_schedule import lr_at

REWARD_SUMS = ("reward", "reward_sq", "completions", "response_tokens", "no_signal")


@dataclass
class GRPOInputs:
    """What a GRPO run samples from and scores with, checked before any process group starts."""
    examples: list[dict]
    rewards: dict[str, Callable]  # rl.reward name -> its function
    tokenizer: Any
    template: Optional[ChatTemplate]


def grpo_inputs(cfg, tokenizer) -> GRPOInputs:
    """rl.prompts, rl.reward and the chat template, loaded (ValueError naming the key otherwise)."""
    rl = cfg.rl
    names = [rl.reward] if isinstance(rl.reward, str) else list(rl.reward or [])
    if not names or len(set(names)) != len(names):
        raise ValueError(f"rl.reward={rl.reward}: give a module:function, or a list of distinct ones")
    rewards = {name: load_reward(name) for name in names}
    examples = load_prompts(rl.prompts, cfg.train.seed)
    fields = {k: [v] for k, v in examples[0].items() if k != "prompt"}
    for name, fn in rewards.items():  # the prompts' fields are what each reward reads: try one
        try:
            score(fn, name, [examples[0]["prompt"]], [""], fields)
        except RewardError as err:
            raise RewardError(f"{err} (tried on rl.prompts={rl.prompts}'s first example, with the fields "
                              f"{sorted(fields)}, and an empty completion)") from err
    template = None
    if rl.chat_template:
        try:
            template = ChatTemplate.of_tokenizer(tokenizer)
        except ChatError as err:
            raise ValueError(f"rl.chat_template=true: {err}; or set rl.chat_template=false to sample from the "
                             "prompts' raw text") from err
    if tokenizer.eos_id is None:
        raise ValueError(f"rl.algorithm=grpo: the tokenizer {cfg.data.tokenizer} has no end-of-sequence token to "
                         "end completions with")
    cfg.train.global_batch = rl.prompts_per_step * rl.group_size  # completions per step
    if cfg.optim.get("decay_steps") is None:
        cfg.optim.decay_steps = cfg.train.max_steps
    return GRPOInputs(examples, rewards, tokenizer, template)


def completion_seed(seed: int, step: int, row: int) -> int:
    """The seed of completion `row` (its index in the step's global batch) of step `step`."""
    return (seed * 0x9E3779B1 + step * 1_000_003 + row) % 2**63


class GRPOLoop(TrainingLoop):
    def __init__(self, *args, inputs: GRPOInputs) -> None:
        super().__init__(*args)
        self.inputs = inputs
        self.batch: Optional[Rollout] = None  # this rank's rollout of the step
        self.step_tokens = 0  # the step's sequence tokens over all ranks, each pass over the rollout
        self.rollout_s = 0.0
        self.first_reward: Optional[float] = None

    def forward_backward(self, step: int) -> StepInput:
        self.phase = "rollout"
        rl, tcfg, b = self.cfg.rl, self.cfg.train, self.b
        started = time.perf_counter()
        lr = lr_at(step, b.progress.tokens, self.cfg.optim)
        for group in b.optimizer.param_groups:
            group["lr"] = lr
        batch = self.batch = self._rollout(step)
        self.rollout_s = time.perf_counter() - started
        counts = torch.tensor([float(batch.targets_BS.sum()), float(batch.valid_BS.sum())], dtype=torch.float64,
                              device=self.device)
        if self.world.size > 1:  # pp = 1: every rank is a data rank
            torch.distributed.all_reduce(counts)
        targets, tokens = counts.tolist()
        self.step_tokens = int(tokens) * rl.inner_steps
        # FLOPs per trained token at the rollout's length, the sampler's forward (a third of a
        # training token's) included, for throughput/tflops and /mfu
        self.flops_per_token = (self.spec.flops_per_token(self.cfg.model, batch.inputs_BS.shape[1])
                                * (rl.inner_steps + 1 / 3) / rl.inner_steps)
        self.phase = "forward_backward"
        rows = len(micro_rows(batch, tcfg.micro_batch))
        denominator = max(targets, 1.0) / (rows * self.data_ranks)  # the global mean over completion tokens
        if rl.beta > 0:
            batch.logp_ref_BS = b.micro.reference_logprobs(batch, tcfg.micro_batch, b.reference)
        sums = None
        for inner in range(rl.inner_steps):
            if inner:  # the passes before the last step here; the loop steps after the last
                self.apply_gradients(step)
                self.phase = "forward_backward"
            done = b.micro.run_rollout(batch, tcfg.micro_batch, denominator, rl.clip_eps, rl.beta)
            sums = done if sums is None else sums + done
        inputs = StepInput(step, lr, tcfg.global_batch, 0, [None] * rows, started)
        inputs.loss_sums = sums
        return inputs

    def _rollout(self, step: int) -> Rollout:
        rl, seed = self.cfg.rl, self.cfg.train.seed
        per_rank = rl.prompts_per_step // self.data_ranks
        rank = self.groups.data_rank
        examples = step_prompts(self.inputs.examples, step, rl.prompts_per_step, seed)[rank * per_rank:
                                                                                       (rank + 1) * per_rank]
        first_row = rank * per_rank * rl.group_size
        generators = [torch.Generator(device=self.device).manual_seed(completion_seed(seed, step, first_row + i))
                      for i in range(per_rank * rl.group_size)]
        settings = RolloutSettings(rl.group_size, rl.max_new_tokens, rl.temperature, 1.0, rl.router_replay,
                                   self.inputs.template, run_all_steps=self.groups.dims.expert_ranks > 1)
        self.b.finalizer.finish_gather()  # ZeRO-1: the updated parameters, whole, before sampling
        self.b.micro.weights_changed()
        with self.b.micro.autocast():
            return rollout(self.b.model, self.inputs.tokenizer, examples, settings, self.inputs.rewards, generators)

    def _step_tokens(self, inputs: StepInput) -> int:
        return self.step_tokens

    def _step_parts(self, inputs: StepInput) -> dict:
        parts = super()._step_parts(inputs)
        batch = self.batch
        rewards_B = batch.rewards_B.double()
        flat_G = rewards_B.view(-1, self.cfg.rl.group_size).std(dim=1) == 0  # groups whose rewards are all equal
        sums = [rewards_B.sum(), (rewards_B ** 2).sum(), float(rewards_B.numel()), float(batch.targets_BS.sum()),
                float(flat_G.sum()) * self.cfg.rl.group_size]
        sums += [part.double().sum() for part in batch.reward_parts.values()]
        parts["rewards"] = torch.tensor([float(v) for v in sums], dtype=torch.float64, device=self.device)
        all_routers = routers(self.b.model)
        if all_routers and batch.loads:
            names = {id(m): name for name, m in self.b.model.named_modules()}
            E = all_routers[0].expert_bias.shape[0]  # a router the sampler did not run (MTP's) took none
            parts["rollout_loads_LE"] = torch.stack([batch.loads.get(names[id(r)], torch.zeros(E)).double()
                                                     for r in all_routers]).to(self.device)
        return parts

    def record(self, inputs: StepInput, grad_norm: float, summed: dict, extra: dict) -> dict:
        rl, step = self.cfg.rl, inputs.step
        metrics = self._throughput(step + 1, inputs.lr, grad_norm, time.perf_counter() - inputs.started,
                                   self.step_tokens)
        grpo = dict(zip(GRPO_SUMS, summed.pop("losses").tolist()))
        tokens = max(grpo["tokens"], 1.0)
        metrics.update({"loss": grpo["loss"] / (len(inputs.micro_batches) * self.data_ranks * rl.inner_steps),
                        "rl/kl": grpo["kl"] / tokens, "rl/clip_fraction": grpo["clipped"] / tokens,
                        "rl/ratio_mean": grpo["ratio"] / tokens, "rl/entropy": grpo["entropy"] / tokens,
                        "rl/rollout_s": self.rollout_s})
        rewards = summed.pop("rewards").tolist()
        named = dict(zip(REWARD_SUMS, rewards))
        n = named["completions"]
        mean = named["reward"] / n
        metrics.update({"rl/reward_mean": mean, "rl/reward_std": math.sqrt(max(named["reward_sq"] / n - mean**2, 0.0)),
                        "rl/response_length": named["response_tokens"] / n,
                        "rl/no_signal_fraction": named["no_signal"] / n})  # groups whose rewards are all equal
        for name, total in zip(self.inputs.rewards, rewards[len(REWARD_SUMS):]):
            metrics[f"rl/reward/{name}"] = total / n
        metrics.update(self._load_metrics(summed))
        metrics.update(comm_metrics(summed, self.world.size))
        metrics["train/global_batch"] = inputs.batch
        metrics.update(extra)
        metrics.update({"memory/optimizer_state_gib": self.optimizer_gib or 0.0,
                        "train/skipped_steps": self.b.progress.skipped_steps})
        self.first_reward = mean if self.first_reward is None else self.first_reward
        self._write(metrics, step)
        self.batch = None  # the next rollout samples without this one's tensors alive
        return metrics

    def _load_metrics(self, summed: dict) -> dict:
        """The experts' loads while sampling, per layer, and how far the training forwards' loads
        are from them: the total variation distance of the two shares (0 under routing replay)."""
        if "rollout_loads_LE" not in summed or "loads_LE" not in summed:
            return {}
        metrics, distances = {}, []
        for router, sampled_E, trained_E in zip(routers(self.b.model), summed.pop("rollout_loads_LE").cpu(),
                                                summed["loads_LE"].cpu()):
            layer = router.layer_idx
            if float(sampled_E.sum()) == 0 or float(trained_E.sum()) == 0:
                continue  # a router the sampler does not run (MTP's)
            distance = 0.5 * float((sampled_E / sampled_E.sum() - trained_E / trained_E.sum()).abs().sum())
            metrics[f"moe/rollout_load/layer_{layer}"] = [int(v) for v in sampled_E.tolist()]
            metrics[f"moe/rollout_vs_train/layer_{layer}"] = distance
            distances.append(distance)
        if distances:
            metrics["moe/rollout_vs_train"] = sum(distances) / len(distances)
        return metrics

    def _close(self, metrics: dict, first_loss) -> None:
        if metrics and self.first_reward is not None:
            self._note(f"rl/reward_mean {self.first_reward:.4f} -> {metrics['rl/reward_mean']:.4f}", main_only=True)
        if self.b.reference is not None:
            self.b.reference.close()
        super()._close(metrics, first_loss)
