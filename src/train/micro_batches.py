"""Forward and backward of one optimizer step's micro-batches on this rank.

- `LocalMicroBatches` (pp = 1): the whole model runs each micro-batch, losses scaled by 1/n.
- `PipelinedMicroBatches` (pp > 1): this rank runs its stages' actions of the pipeline schedule.

A micro-batch is (input ids, labels), or (input ids, labels, position ids) for rows of packed
samples (chat data): each sample then attends only to itself (moetron.models.common.packed).

Both return the sum, over the micro-batches this rank saw, of the model's loss terms
(`moetron.models.outputs.LossTerms.logged()`: total, lm, mtp, balance) as a float64 tensor on the
device; a pipeline rank's sum holds its stages' part, and the trainer's one metrics reduction adds
up the pipeline. Nothing is synchronised with the host here.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from moetron.core.saved_tensors import SavedTensorMeter, module_state
from moetron.models.common.context_parallel import SequenceSplit
from moetron.models.common.packed import PackedSamples
from moetron.models.outputs import LOSS_TERMS
from moetron.pipeline.runtime import PipelineRunner
from moetron.pipeline.schedule import forward_only
from moetron.precision.fp8_linear import forget_weight_blocks


class _MicroBatches:
    """What both share: the device, the compute dtype (autocast) and the loss sum's shape."""

    idle: torch.Tensor | None = None  # pipelines: this rank's idle share of the last step, on the device
    split: Optional[SequenceSplit] = None  # parallel.cp > 1: this rank's share of every row (the trainer's)

    def __init__(self, device: torch.device, compute_dtype: torch.dtype, params) -> None:
        self.device, self.dtype = device, compute_dtype
        # what the forwards keep for their backward: memory/activations_gib (moetron.core.saved_tensors)
        self.meter = SavedTensorMeter(params)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=self.device)

    def _on_device(self, micro_batch) -> tuple[torch.Tensor, torch.Tensor, Optional[PackedSamples]]:
        """(input ids, labels, packed samples or None) of a micro-batch, on the device; under context
        parallelism this rank's share of its rows, with the rows' ContextState in the samples."""
        inputs, labels, *packing = (t.to(self.device) for t in micro_batch)  # positions, real tokens
        if self.split is not None:
            return self.split.shard(inputs, labels, *packing)
        return inputs, labels, PackedSamples(*packing) if packing else None

    def _new_weights(self, modules) -> None:
        """The weights may have changed since the last pass (an optimizer step, ZeRO-1's gather, an
        average swapped in): caches of them made for the last pass are stale."""
        forget_weight_blocks(modules)


class LocalMicroBatches(_MicroBatches):
    def __init__(self, model, device, compute_dtype, grads=None) -> None:
        """`grads` (optional, the step finalizer): told that the step's last backward adds every
        parameter's last gradient (`expect_final` before it, `mark_final` after), so each bucket's
        reduction starts while that backward goes on."""
        super().__init__(device, compute_dtype, module_state([model]))
        self.model, self.grads = model, grads
        self._params = [p for p in model.parameters() if p.requires_grad and not p.is_meta]

    def run(self, micro_batches, loss_options: dict) -> torch.Tensor:
        logged = self._zeros()
        self._new_weights([self.model])
        for i, micro_batch in enumerate(micro_batches):
            inputs, labels, samples = self._on_device(micro_batch)
            self.meter.ignore((inputs, labels))
            with self._autocast(), self.meter.saving(i):
                out = self.model(inputs, labels, samples=samples, **loss_options)
            self.meter.sample()
            self._backward(out.loss / len(micro_batches), last=i == len(micro_batches) - 1)
            logged += out.logged()
        return logged

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """`loss.backward()`; around the step's last one, the step finalizer is told that it makes
        every parameter's gradient final."""
        final = last and self.grads is not None
        if final:
            self.grads.expect_final(self._params)
        loss.backward()
        if final:
            self.grads.mark_final(self._params)

    @torch.no_grad()
    def evaluate(self, micro_batches, loss_options: dict) -> torch.Tensor:
        """The summed loss terms of `micro_batches`, forward only, in eval mode (the routers count no
        load and add no balance loss)."""
        logged = self._zeros()
        self._new_weights([self.model])
        self.model.eval()
        try:
            for micro_batch in micro_batches:
                inputs, labels, samples = self._on_device(micro_batch)
                with self._autocast():
                    logged += self.model(inputs, labels, samples=samples, **loss_options).logged()
        finally:
            self.model.train()
        return logged


def stage_parameters(schedule, parts) -> dict[int, list]:
    """Stage -> the parameters its backward reaches on this rank (its module's and, on a chain's
    last stage, the loss tail's), in reversed model order: the order one backward finishes them."""
    tail = list(parts.tail.parameters()) if parts.tail is not None else []
    out = {}
    for stage, module in parts.stage_modules.items():
        params = {id(p): p for p in [*module.parameters(), *(tail if stage in schedule.last_stages() else [])]}
        out[stage] = [p for p in reversed(params.values()) if p.requires_grad and not p.is_meta]
    return out


class PipelinedMicroBatches(_MicroBatches):
    def __init__(self, schedule_for, parts, pp_rank: int, pp_lanes, p2p_shape: tuple[int, ...], device,
                 compute_dtype, overlap_fb: bool = True, weight_grad_store=None, grads=None,
                 stage_params: Optional[dict] = None, deferred: frozenset = frozenset(),
                 p2p_dtype: torch.dtype = torch.float32) -> None:
        """`schedule_for(n)`: the schedule of a step of n micro-batches (a batch-size ramp changes n;
        the stages a rank holds do not change); `parts`: this rank's stage modules and loss tail
        (`moetron.models.stages.pipeline_split`); `pp_lanes`: the pipeline group with its lanes
        (`ParallelGroups.lanes("pp")`); `grads` (optional, the step finalizer): told when each
        parameter's gradients are final, from `stage_params` (`stage_parameters`) and `deferred`: ids
        of the parameters whose weight gradients B actions defer; `p2p_dtype`: what activations
        travel between stages in (the residual stream's dtype: the working weights'). A runner is
        made per micro-batch count and use when first needed, on every pipeline rank at the same step."""
        super().__init__(device, compute_dtype, module_state(parts.held_modules))
        self.parts, self._schedule_for = parts, schedule_for
        self._runner_args = (pp_rank, parts.stage_modules, pp_lanes, p2p_shape, p2p_dtype)
        self._overlap, self._store = overlap_fb, weight_grad_store
        self._grads, self.stage_params, self._deferred = grads, stage_params, deferred
        self._runners: dict[tuple[int, bool], PipelineRunner] = {}

    def _runner(self, n: int, forward_only_: bool) -> PipelineRunner:
        if (n, forward_only_) not in self._runners:
            schedule = self._schedule_for(n)
            if forward_only_:  # evaluation: the schedule's forwards only
                runner = PipelineRunner(forward_only(schedule), *self._runner_args, overlap=False, device=self.device)
            else:
                runner = PipelineRunner(schedule, *self._runner_args, overlap=self._overlap, device=self.device,
                                        store=self._store, grads=self._grads, stage_params=self.stage_params,
                                        deferred=self._deferred, meter=self.meter)
            self._runners[(n, forward_only_)] = runner
        return self._runners[(n, forward_only_)]

    def _step(self, micro_batches, loss_options: dict, train: bool) -> torch.Tensor:
        runner = self._runner(len(micro_batches), forward_only_=not train)
        self._new_weights(self.parts.held_modules)
        for stage in self.parts.stage_modules.values():  # balance losses scale as the step's losses do
            if hasattr(stage, "aux_scale"):
                stage.aux_scale = 1.0 / len(micro_batches)
        inputs, targets, stage_kwargs = {}, {}, {}
        for i, micro_batch in enumerate(micro_batches):
            x, y, samples = self._on_device(micro_batch)
            inputs[i], targets[i] = x, (x, y) if samples is None else (x, y, samples)
            if samples is not None:
                stage_kwargs[i] = {"samples": samples}
        tail = self.parts.tail
        loss_fn = functools.partial(tail, **loss_options) if tail is not None else None
        with self._autocast():
            result = runner.step(inputs, targets, loss_fn, loss_scale=1.0 / len(micro_batches) if train else 1.0,
                                 stage_kwargs=stage_kwargs)
        if train:
            self.last_runner = runner  # its action_spans are the step's timeline
            busy = runner.busy_s / max(runner.step_s, 1e-12)
            self.idle = torch.tensor(1.0 - busy, dtype=torch.float64, device=self.device)
        return result.metrics if result.metrics is not None else self._zeros()

    def run(self, micro_batches, loss_options: dict) -> torch.Tensor:
        return self._step(micro_batches, loss_options, train=True)

    @torch.no_grad()
    def evaluate(self, micro_batches, loss_options: dict) -> torch.Tensor:
        """This rank's part of the summed loss terms of `micro_batches` (as `run`), forwards only, in
        eval mode; the trainer's metrics reduction adds up the pipeline."""
        tail = self.parts.tail
        modules = [*self.parts.stage_modules.values(), *([tail] if tail is not None else [])]
        for module in modules:
            module.eval()
        try:
            return self._step(micro_batches, loss_options, train=False)
        finally:
            for module in modules:
                module.train()
