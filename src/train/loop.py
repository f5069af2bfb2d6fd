"""The training loop of one run, in named steps. One optimizer step:

1. `forward_backward`: this step's batch (a batch-size ramp sets its size), its learning rate, and
   this rank's micro-batches forward and backward (moetron.train.micro_batches); gradients reach
   the gradient buffers, whose buckets may already be reducing;
2. `apply_gradients`: the step finalizer reduces, sums and clips (moetron.parallel.finalize); a
   finite norm steps AdamW, a non-finite one stops or skips the step (`train.on_nonfinite`);
3. `reduce_metrics`: the step's metrics (loss terms, bubble, all-to-all bytes, the spec's
   statistics) summed over all ranks in one all-reduce, with the stop flag; the spec's hook moves
   the routing biases;
4. `record`: the logged values, an evaluation when due, rank 0's jsonl / W&B / console, a timeline
   and a profile when asked for;
5. `checkpoint_if_due`: every `train.ckpt_every` steps, at the end, and when a stop was asked for.
"""
from __future__ import annotations

import functools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch
from moetron.checkpoint.run_state import save
from moetron.comm.packed import all_reduce_packed
from moetron.models.outputs import named_losses
from moetron.pipeline.timeline import save_rank_timeline
from moetron.profiling import StepProfiler
from moetron.train.batch_ramp import global_batch_at
from moetron.train.evaluate import evaluate
from moetron.train.interrupts import (
    StopRequests,
    TrainingStopped,
    first_nonfinite_gradient,
    is_timeout,
)
from moetron.train.lr_schedule import lr_at
from moetron.train.metrics import Console, JsonlWriter, WandbLogger, peak_memory_gib
from moetron.train.optim import optimizer_state_gib

# phase of a step -> (its name in messages, the process groups its collectives use: ParallelGroups.members)
PHASES = {"forward_backward": ("the forward and backward passes", ["ep", "pp"]),
          "gradients": ("the gradient reduction", ["dp_ep", "edp", "ep", "pp"]),
          "metrics": ("the metrics reduction", ["world"]),
          "checkpoint": ("writing a checkpoint", ["world"]),
          "rollout": ("sampling the rollout (GRPO)", ["ep", "world"])}


@dataclass
class Built:
    """What the trainer built for this rank (moetron.train.trainer._build), and its state."""
    model: Any
    made: Any  # moetron.models.spec.Parallelized
    micro: Any  # LocalMicroBatches | PipelinedMicroBatches
    finalizer: Any  # moetron.parallel.finalize.StepFinalizer
    optimizer: Any
    ema: Any  # moetron.train.ema.ParameterEMA or None
    progress: Any  # moetron.checkpoint.run_state.Progress: tokens and skipped steps so far
    reference: Any = None  # GRPO's frozen reference model (moetron.train.ema.FrozenReference) or None

    def copies(self) -> list:
        """The parameter copies saved with checkpoints (moetron.train.ema)."""
        return [c for c in (self.ema, self.reference) if c is not None]


@dataclass
class StepInput:
    """One step's batch: its size in sequences, the first sequence, this rank's micro-batches."""
    step: int
    lr: float
    batch: int
    first: int
    micro_batches: list
    started: float  # time.perf_counter() at the step's start
    loss_sums: Any = None  # this rank's summed loss terms (moetron.train.micro_batches), once run


class TrainingLoop:
    def __init__(self, cfg, config_dict: dict, run_dir, world, groups, device, spec, sampler, valid,
                 built: Built) -> None:
        """`cfg`: the typed settings (RootConfig, `cfg.model` the spec's config); `config_dict`: the
        composed config as a dict (saved with checkpoints, sent to W&B)."""
        self.cfg, self.config_dict, self.run_dir, self.world, self.groups = cfg, config_dict, run_dir, world, groups
        self.device, self.spec, self.sampler, self.valid, self.b = device, spec, sampler, valid, built
        tcfg = cfg.train
        self.start_step = built.progress.step
        self.end_step = (tcfg.max_steps if not tcfg.exit_after_steps
                         else min(tcfg.max_steps, self.start_step + tcfg.exit_after_steps))
        self.data_ranks = groups.dims.data_ranks  # every dp x ep rank of a stage reads its own sequences
        self.loss_ranks = groups.dims.stage_ranks  # and its cp ranks each a share of them: the losses' mean
        self.flops_per_token = spec.flops_per_token(cfg.model, tcfg.seq_len)  # from the config: any layout
        self.loss_names = spec.loss_metrics(cfg.model)
        self.phase = "forward_backward"  # named if a peer stops answering (PHASES)
        self.optimizer_gib: Optional[float] = None  # this rank's optimizer state and master weights
        self.jsonl = self.wandb = self.console = None
        if world.is_main:
            self.jsonl = JsonlWriter(run_dir / "metrics.jsonl", self.start_step)
            self.wandb = WandbLogger(cfg.logging.wandb, run_dir, config_dict, self.start_step, cfg.logging.heatmap_every)
            self.console = Console(cfg.logging.progress, self.start_step, tcfg.max_steps, tcfg.log_every)
        self.profiler = StepProfiler(cfg.logging.profile, world.rank, run_dir, device)

    def run(self) -> dict:
        """Train from the resumed step to the end (or a stop); returns the last step's metrics."""
        metrics, first_loss, step = {}, None, self.start_step
        with StopRequests() as stops:  # SIGTERM / SIGUSR1 / SIGINT: finish the step, checkpoint, exit
            try:
                for step in range(self.start_step, self.end_step):
                    self.profiler.begin(step + 1)
                    inputs = self.forward_backward(step)
                    grad_norm, finite = self.apply_gradients(step)
                    summed, stop_now, extra = self.reduce_metrics(inputs, stops, finite)
                    metrics = self.record(inputs, grad_norm, summed, extra)
                    first_loss = metrics["loss"] if first_loss is None else first_loss
                    self.checkpoint_if_due(step, stop_now)
                    if stop_now:
                        self._note(f"stopped by {stops.reason() or 'a stop signal on another rank'} after step "
                                   f"{step + 1}, checkpoint written in {self.run_dir / 'checkpoints'}; run the same "
                                   "command to resume", main_only=True)
                        break
            except RuntimeError as err:
                if not is_timeout(err):
                    raise
                raise self._timeout(step, err) from err
            finally:
                self._close(metrics, first_loss)
        return metrics

    # -- the named steps ---------------------------------------------------------------------------
    def forward_backward(self, step: int) -> StepInput:
        self.phase = "forward_backward"
        tcfg, progress = self.cfg.train, self.b.progress
        started = time.perf_counter()
        lr = lr_at(step, progress.tokens, self.cfg.optim)
        for group in self.b.optimizer.param_groups:
            group["lr"] = lr
        batch = global_batch_at(progress.tokens, tcfg.global_batch, tcfg.batch_ramp)  # sequences in this step
        first = progress.tokens // tcfg.seq_len
        micro_batches = list(self.sampler.micro_batches(first, batch, tcfg.micro_batch, self.groups.data_rank,
                                                        self.data_ranks))
        inputs = StepInput(step, lr, batch, first, micro_batches, started)
        options = loss_options(self.spec, self.cfg.model, tcfg, progress.tokens, self.sampler, first, batch,
                               len(micro_batches) * self.loss_ranks)
        inputs.loss_sums = self.b.micro.run(micro_batches, options)
        return inputs

    def apply_gradients(self, step: int) -> tuple[float, bool]:
        """Reduce, clip and step; returns the gradient norm and whether it was finite (every rank agrees:
        it is reduced over all of them)."""
        self.phase = "gradients"
        b = self.b
        grad_norm = b.finalizer.finish_gradients()
        finite = math.isfinite(grad_norm)
        if not finite and self.cfg.train.on_nonfinite == "stop":
            raise TrainingStopped(f"step {step + 1}: the gradient norm is {grad_norm}; the first non-finite gradient on "
                                  f"rank {self.world.rank} is {first_nonfinite_gradient(b.model)}. No checkpoint was "
                                  "written from it; lower optim.lr, or train.on_nonfinite=skip")
        if finite:
            b.optimizer.step()
            if self.optimizer_gib is None:  # the state exists after the first step, and keeps its size
                self.optimizer_gib = optimizer_state_gib(b.optimizer)
        b.progress.skipped_steps += not finite  # train.on_nonfinite=skip: a non-finite gradient norm
        b.finalizer.after_optimizer_step(gather=finite)  # ZeRO-1: gather the updated shards; gradients zeroed
        if b.ema is not None and finite:
            b.finalizer.finish_gather()  # the average reads the updated parameters
            b.ema.update()  # copied now, blended in on a worker thread
        return grad_norm, finite

    def reduce_metrics(self, inputs: StepInput, stops, finite: bool) -> tuple[dict, bool, dict]:
        """The step's metrics summed over all ranks (one all-reduce, the stop flag with them); the
        spec's post-step hook (routing biases). Returns (summed, stop now, the hook's metrics)."""
        self.phase = "metrics"
        parts = self._step_parts(inputs)
        parts["stop"] = stops.flag(self.device)
        summed = all_reduce_packed(parts, world_size=self.world.size)
        stop_now = float(summed.pop("stop")) > 0
        extra = self.spec.after_step(self.b.model, summed, self.cfg.train, self.b.progress.tokens, update=finite)
        self.b.progress.tokens += self._step_tokens(inputs)
        return summed, stop_now, extra

    def record(self, inputs: StepInput, grad_norm: float, summed: dict, extra: dict) -> dict:
        """The step's logged values (an evaluation when due), written by rank 0; a timeline and a
        profile when asked for."""
        tcfg, step = self.cfg.train, inputs.step
        tokens_per_step = inputs.batch * tcfg.seq_len
        metrics = self._throughput(step + 1, inputs.lr, grad_norm, time.perf_counter() - inputs.started,
                                   tokens_per_step)
        metrics.update(_reduced_metrics(summed, self.loss_names, len(inputs.micro_batches) * self.loss_ranks,
                                        self.world.size))
        metrics["train/global_batch"] = inputs.batch
        metrics.update(extra)
        if len(self.sampler.blend.parts) > 1:  # each source's share of this step's sequences
            shares = self.sampler.blend.shares(inputs.first, inputs.batch)
            metrics.update({f"data/share/{name}": share for name, share in shares.items()})
        if tcfg.eval_every and (step + 1) % tcfg.eval_every == 0:
            metrics.update(self._evaluate())
        gib = self.optimizer_gib if self.optimizer_gib is not None else optimizer_state_gib(self.b.optimizer)
        metrics.update({"memory/optimizer_state_gib": gib, "train/skipped_steps": self.b.progress.skipped_steps})
        self._write(metrics, step)
        return metrics

    def _write(self, metrics: dict, step: int) -> None:
        """Rank 0 writes the step's values (jsonl and W&B on logged steps, the console each step); a
        timeline and a profile when asked for."""
        cfg, tcfg = self.cfg, self.cfg.train
        if self.world.is_main:
            if (step + 1) % tcfg.log_every == 0 or step + 1 == self.end_step:
                self.jsonl.log(metrics)
                self.wandb.log(metrics, step + 1)
            self.console.update(metrics)
        dims = self.groups.dims
        if cfg.logging.timeline and dims.pp > 1 and step + 1 == cfg.logging.timeline_step \
                and self.groups.stage_rank == 0:  # one pipeline's ranks
            runner = self.b.micro.last_runner
            save_rank_timeline(self.run_dir / "timeline" / f"rank{self.groups.pp_rank}.json", runner.action_spans,
                               runner.step_started, runner.sched, step + 1, self.groups.pp_rank)
        trace = self.profiler.end(step + 1)
        if trace is not None:
            self._note(f"rank {self.world.rank}: profile of {self.profiler.steps} in {trace}")

    def checkpoint_if_due(self, step: int, stop_now: bool) -> None:
        self.phase = "checkpoint"
        tcfg, b = self.cfg.train, self.b
        if (step + 1) % tcfg.ckpt_every == 0 or step + 1 == self.end_step or stop_now:
            b.finalizer.finish_gather()  # ZeRO-1: the parameters as the optimizer left them
            save(self.run_dir, step + 1, b.progress, b.model, b.optimizer, b.finalizer, self.config_dict,
                 tcfg.ckpt_keep, self.world, self.groups, b.copies())

    # -- helpers -----------------------------------------------------------------------------------
    def _step_tokens(self, inputs: StepInput) -> int:
        """Tokens the step trained on, over all ranks (the count schedules in tokens follow)."""
        return inputs.batch * self.cfg.train.seq_len

    def _step_parts(self, inputs: StepInput) -> dict:
        """This rank's metrics of the step, to be summed over all ranks in one collective."""
        parts = {"losses": inputs.loss_sums}
        micro, made = self.b.micro, self.b.made
        if micro.idle is not None:
            parts["idle"] = micro.idle
        if made.traffic is not None:
            moved = made.traffic.take()  # bytes the forward dispatch and combine sent, by link class
            parts["a2a_bytes"] = torch.tensor([moved["ib"], moved["nvlink"]], dtype=torch.float64, device=self.device)
        parts.update(self.spec.step_stats(self.b.model, self.device))
        return parts

    def _throughput(self, step: int, lr: float, grad_norm: float, step_time: float, tokens_per_step: int) -> dict:
        tokens_per_s = tokens_per_step / step_time
        tflops_per_rank = tokens_per_s * self.flops_per_token / self.world.size / 1e12
        return {"step": step, "tokens": self.b.progress.tokens, "lr": lr, "grad_norm": grad_norm,
                "throughput/tokens_per_s": tokens_per_s, "throughput/tflops": tflops_per_rank,
                "throughput/mfu": tflops_per_rank / self.cfg.cluster.peak_tflops, "step_time_s": step_time,
                "memory/peak_gib": peak_memory_gib(self.device),
                "memory/activations_gib": self.b.micro.meter.take_peak() / 2**30}

    def _evaluate(self) -> dict:
        self.phase = "metrics"
        tcfg, ema = self.cfg.train, self.b.ema
        with ema.swapped_in() if tcfg.eval_ema else nullcontext():
            return evaluate(self.b.micro, self.world.size, self.valid,
                            functools.partial(loss_options, self.spec, self.cfg.model, tcfg, self.b.progress.tokens),
                            self.loss_names, tcfg, self.groups.data_rank, self.groups.dims)

    def _note(self, line: str, main_only: bool = False) -> None:
        if main_only and not self.world.is_main:
            return
        (self.console.note if self.console is not None else lambda text: print(text, flush=True))(line)

    def _timeout(self, step: int, err: RuntimeError) -> TrainingStopped:
        what, group_names = PHASES[self.phase]
        finalizer = self.b.finalizer
        if self.phase == "forward_backward" and (finalizer.overlap_gather or finalizer.overlap_reduce):
            group_names = [*group_names, "dp_ep", "edp"]  # overlapped gradient reductions and ZeRO-1 gathers
        return TrainingStopped(f"step {step + 1}: rank {self.world.rank} had no answer from a peer within "
                               f"train.collective_timeout_s={self.cfg.train.collective_timeout_s:g} s during {what} "
                               f"(its collectives here: {self.groups.describe(group_names)}): a rank is dead or hung "
                               f"(see its log). torch: {str(err).splitlines()[0]}")

    def _close(self, metrics: dict, first_loss: Optional[float]) -> None:
        self.profiler.close()
        if self.b.ema is not None:
            self.b.ema.close()
        if self.world.is_main:
            summary = None
            if metrics:
                maxvio = f", MaxVio {metrics['moe/maxvio_batch']:.3f}" if "moe/maxvio_batch" in metrics else ""
                finished = metrics["step"] >= self.cfg.train.max_steps  # else stopped early, to be resumed
                summary = (f"{'done' if finished else 'stopped'}: step {metrics['step']}/{self.cfg.train.max_steps}, "
                           f"loss {first_loss:.4f} -> "
                           f"{metrics['loss']:.4f}, {metrics['throughput/tokens_per_s']:.0f} tokens/s{maxvio}; "
                           f"run dir {self.run_dir}")
            self.console.close(summary)
            self.jsonl.close()
            self.wandb.close()


def loss_options(spec, model_cfg, tcfg, tokens: int, sampler, first: int, batch: int, loss_count: int) -> dict:
    """The model's loss options for a step (the spec's: MTP weight) and the denominator that
    normalises the loss over the counted targets of the whole global batch: each micro-batch's
    summed cross entropy / (counted targets / `loss_count`: micro-batches x dp x cp x ep ranks), so
    that the trainer's mean over micro-batches and ranks is the global batch's sum / its counted
    targets, the same in every layout, micro-batch split and context-parallel cut. Packed chat data
    counts its assistant targets; token windows count every position. MTP's depths divide by the
    same (eq. 24: each L^k is a sum over the sequence / T)."""
    options = spec.loss_options(model_cfg, tcfg, tokens)
    counted = sampler.counted_targets(first, batch) if sampler.packed else batch * tcfg.seq_len
    options["loss_denominator"] = max(counted, 1) / loss_count
    return options


def _reduced_metrics(summed: dict, loss_names: dict, loss_count: int, world_size: int) -> dict:
    """The loop's own parts of the step's summed metrics (`_step_parts`), as logged values."""
    # each pipeline rank summed its part of its micro-batches' losses: / (micro-batches x dp x cp x ep)
    losses = summed.pop("losses") / loss_count
    return {**named_losses(losses, loss_names), **comm_metrics(summed, world_size)}


def comm_metrics(summed: dict, world_size: int) -> dict:
    """The all-to-all bytes and the pipeline bubble of the step's summed metrics, as logged values."""
    metrics = {}
    if "a2a_bytes" in summed:
        ib, nvlink = summed.pop("a2a_bytes").tolist()
        metrics.update({"comm/a2a_bytes/ib": int(ib), "comm/a2a_bytes/nvlink": int(nvlink)})
    if "idle" in summed:  # the measured idle share of the step, mean over all ranks
        metrics["pipeline/bubble_ratio"] = float(summed.pop("idle")) / world_size
    return metrics
