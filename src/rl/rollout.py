"""One GRPO rollout: G completions sampled for each prompt, scored, with what the policy step needs
(the sampling policy's log-probabilities, the group advantages, the routes the experts took).

    batch = rollout(model, tokenizer, examples, RolloutSettings(group_size=8, max_new_tokens=32),
                    {"moetron.rl.task:exact_answer": exact_answer}, generator)
    logp_BS = policy_logprobs(model, batch)          # the training forward, routes replayed
    terms = grpo_loss(logp_BS, batch.logp_old_BS, batch.advantages_B, batch.targets_BS, ...)

A batch's sequences are its prompts left-padded to the longest, then the completions right-padded
to the longest: the inputs of the training forward are sequences[:, :-1] (the tokens the sampler
ran, in the positions it ran them), its targets sequences[:, 1:], of which only completion tokens
count (`targets_BS`).

Shape legend: B = prompts x G completions, S tokens of a sequence minus one (inputs and targets).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from moetron.data.chat import ChatTemplate
from moetron.models.common.packed import PackedSamples
from moetron.models.generate import generate
from moetron.rl.grpo import group_advantages, token_logprobs
from moetron.rl.replay import recording, replaying, rollout_loads
from moetron.rl.rewards import score


@dataclass
class RolloutSettings:
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    router_replay: bool = True  # record the experts each token took, for the training forward
    # (top_p stays 1: the ratio's old log-probabilities are those of the softmax / temperature)
    chat_template: Optional[ChatTemplate] = None  # render each prompt as a user turn (else raw text)
    run_all_steps: bool = False  # every rank runs max_new_tokens forwards (expert parallelism needs it)


@dataclass
class Rollout:
    inputs_BS: torch.Tensor  # the sampler's tokens (prompt, completion but its last token)
    positions_BS: torch.Tensor
    valid_BS: torch.Tensor  # False on padding
    labels_BS: torch.Tensor  # the next token of each input
    targets_BS: torch.Tensor  # True where the label is a completion token (what the loss counts)
    logp_old_BS: torch.Tensor  # the sampling policy's log-probability of each label (0 off targets)
    rewards_B: torch.Tensor
    advantages_B: torch.Tensor
    temperature: float  # what the sampler divided the logits by (the training forward does too)
    routes: Optional[dict]  # router name -> experts [B, S, K] (None without routing replay)
    completions: list[str]
    reward_parts: dict  # reward function name -> its rewards [B] (their sum is rewards_B)
    loads: dict  # router name -> [E] tokens of the inputs each expert took while sampling
    logp_ref_BS: Optional[torch.Tensor] = None  # the reference model's (GRPO's KL term), when it has one


def _prompt_ids(tokenizer, text: str, template: Optional[ChatTemplate]) -> list[int]:
    if template is None:
        return tokenizer.encode(text).tolist()
    rendered = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode_with_offsets(rendered)[0].tolist()


def rollout(model: nn.Module, tokenizer, examples: list[dict], settings: RolloutSettings,
            rewards: dict[str, Callable], generator=None) -> Rollout:
    """Sample, score and lay out one batch (`examples`: {"prompt": ..., other fields the reward reads});
    `rewards`: name -> function, the reward being their sum; `generator`: one for the batch, or one per
    completion (prompt-major: G per example), which makes each completion independent of the batch
    it is drawn in."""
    if settings.top_p != 1.0:
        raise ValueError(f"GRPO rollouts sample the whole distribution (top_p={settings.top_p}): the importance "
                         "ratio would compare against a distribution the tokens were not drawn from; set top_p=1")
    G = settings.group_size
    prompts = [ex["prompt"] for ex in examples for _ in range(G)]
    prompt_ids = [_prompt_ids(tokenizer, p, settings.chat_template) for p in prompts]
    with recording(model) as routes:  # the experts' loads; with routing replay, the training forward's routes
        completion_ids, logprobs = generate(model, prompt_ids, settings.max_new_tokens, settings.temperature,
                                            settings.top_p, [tokenizer.eos_id], generator, return_logprobs=True,
                                            run_all_steps=settings.run_all_steps)
    texts = [tokenizer.decode([t for t in c if t != tokenizer.eos_id]) for c in completion_ids]
    fields = {k: [ex[k] for ex in examples for _ in range(G)] for k in examples[0] if k != "prompt"}
    parts = {name: torch.tensor(score(fn, name, prompts, texts, fields), dtype=torch.float32)
             for name, fn in rewards.items()}
    rewards_B = torch.stack(list(parts.values())).sum(dim=0)
    advantages_B = group_advantages(rewards_B.view(len(examples), G)).flatten()

    B, L = len(prompts), max(len(p) for p in prompt_ids)
    T = max(len(c) for c in completion_ids)
    sequences_BN = torch.zeros(B, L + T, dtype=torch.long)
    valid_BN = torch.zeros(B, L + T, dtype=torch.bool)
    logp_BN = torch.zeros(B, L + T)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        sequences_BN[b, L - len(p):L + len(c)] = torch.tensor(p + c)
        valid_BN[b, L - len(p):L + len(c)] = True
        logp_BN[b, L:L + len(c)] = torch.tensor(logprobs[b])
    positions_BN = (valid_BN.long().cumsum(dim=1) - 1).clamp(min=0)
    targets_BN = valid_BN.clone()
    targets_BN[:, :L] = False
    device = next(p.device for p in model.parameters() if not p.is_meta)
    loads = rollout_loads(model, routes, valid_BN[:, :-1])
    # the sampler ran the inputs (and more forwards when it ran every step): their routes replay
    replayed = {name: chosen[:, :L + T - 1].to(device) for name, chosen in routes.items()} \
        if settings.router_replay else None
    return Rollout(sequences_BN[:, :-1], positions_BN[:, :-1], valid_BN[:, :-1], sequences_BN[:, 1:],
                   targets_BN[:, 1:], logp_BN[:, 1:], rewards_B, advantages_B, settings.temperature, replayed, texts,
                   parts, loads)


def policy_logprobs(model: nn.Module, batch: Rollout, rows: Optional[slice] = None,
                    with_entropy: bool = False):
    """[B, S] log-probabilities of the labels under the model now (0 off the targets), its routers
    replaying the sampled routes when the batch has them; `rows`: a micro-batch of the rollout.
    `with_entropy`: also [B, S] the entropy of each predicted distribution (no gradient; 0 off targets)."""
    rows = rows or slice(None)
    device = next(p.device for p in model.parameters() if not p.is_meta)
    inputs_BS = batch.inputs_BS[rows].to(device)
    samples = PackedSamples(batch.positions_BS[rows].to(device), batch.valid_BS[rows].to(device))
    routes = None if batch.routes is None else {name: chosen[rows] for name, chosen in batch.routes.items()}
    with replaying(model, routes) if routes is not None else nullcontext():
        logits_BSV = model(inputs_BS, samples=samples)
    targets_BS = batch.targets_BS[rows].to(device)
    labels_BS = batch.labels_BS[rows].to(device)
    if not with_entropy:
        return token_logprobs(logits_BSV, labels_BS, batch.temperature) * targets_BS
    logp_BS, entropy_BS = token_logprobs(logits_BSV, labels_BS, batch.temperature, with_entropy=True)
    return logp_BS * targets_BS, entropy_BS * targets_BS
