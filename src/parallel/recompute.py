"""Selective recomputation: store a function's inputs, free its outputs, recompute them in backward.

DeepSeek-V3 (report section 3.2.3) recomputes RMSNorm, the MLA up-projections and the SwiGLU output
in backward instead of keeping them. The memory those outputs take is held by their *consumers*
(the linear that reads a norm's output saves it for its weight gradient), so checkpointing the
function alone saves nothing. `OutputRecompute` therefore works like Megatron-Core's
`CheckpointWithoutOutput`:

1. `run(fn, *inputs)` runs `fn` without building a graph and saves only `inputs`;
2. the caller lets the consumers run, then calls `discard(after=t)` with a tensor `t` computed from
   the consumers: the outputs' storage is freed now, and a gradient hook on `t` recomputes it in
   place before any consumer's backward reads it;
3. the backward of `run` back-propagates through the recomputed graph.

Forward values and every gradient are bitwise those of running `fn` directly: the same kernels run
on the same inputs, and the same summed output gradient enters the same backward. A region that
keeps its inputs in another form (`keep`: FP8 tiles, with FP8-cached activations) recomputes from
what it kept, so its backward is that of the kept inputs, as FP8 caching's own is.

Which parts recompute is a run setting (`recompute.norm|mla_up_proj|swiglu`), applied by the
`SelectiveRecompute` converter to the `recompute_<switch>` slots that layers declare. Inside a
compiled block (`train.compile`) `run` and `discard` stay eager (`torch.compiler.disable`): dynamo
cannot trace their side effects, and trying costs more graphs (19 against 11 for two tiny blocks).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class _RunWithoutGraph(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, owner, *inputs):
        ctx.owner = owner
        ctx.save_for_backward(*owner.kept)  # what the region keeps, as saved tensors (what memory accounting counts)
        with torch.no_grad():
            outputs = fn(*inputs)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        owner = ctx.owner
        if owner.recomputed_outputs is None:  # discard() was never called: recompute here
            owner.recompute_now()
        outputs, inputs = owner.recomputed_outputs, owner.recomputed_inputs
        owner.release()  # what it kept is not needed again
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None) + tuple(inp.grad if inp.requires_grad else None for inp in inputs)


class OutputRecompute:
    """One recomputed region; use a fresh object per call of `run` (see the module docstring).

    `keep` (optional) is how the region keeps its inputs: `keep.pack(inputs) -> (tensors, meta)` in
    the forward, `keep.unpack(tensors, meta) -> inputs` before recomputing (FP8 tiles: the report's
    cached SwiGLU inputs, moetron.precision.fp8_swiglu.FP8Inputs); the gradients computed at the
    unpacked inputs go to the originals. Without, the inputs are kept as they are."""

    def __init__(self, keep=None) -> None:
        self.fn: Callable | None = None
        self.keep, self.meta = keep, None
        self.kept: tuple[torch.Tensor, ...] = ()
        self.needs_grad: tuple[bool, ...] = ()
        # the outputs' storages, not the outputs: an output holds its autograd node, which holds this
        # region, a cycle that would keep a graph dropped without a backward alive
        self.storages: tuple[torch.UntypedStorage, ...] = ()
        self.recomputed_outputs: tuple[torch.Tensor, ...] | None = None
        self.recomputed_inputs: tuple[torch.Tensor, ...] | None = None

    @torch.compiler.disable  # eager inside a compiled block: one graph break, no tracing attempt
    def run(self, fn: Callable, *inputs: torch.Tensor):
        self.fn, self.needs_grad = fn, tuple(t.requires_grad for t in inputs)
        if self.keep is not None:
            with torch.no_grad():  # the kept form is data, not part of the graph
                self.kept, self.meta = self.keep.pack(inputs)
        else:
            self.kept = inputs
        outputs = _RunWithoutGraph.apply(fn, self, *inputs)
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        self.storages = tuple(out.untyped_storage() for out in outs)
        for out in outs:  # its consumers keep a reference, not a copy (FP8 linears: moetron.precision)
            out.recomputed_in_backward = True
        return outputs

    @torch.compiler.disable
    def discard(self, after: torch.Tensor) -> None:
        """Free the outputs now; recompute them when the gradient of `after` is computed."""
        if not after.requires_grad:
            return
        for storage in self.storages:
            storage.resize_(0)
        after.register_hook(self._refill)

    def release(self) -> None:
        """Drop every tensor the region holds, after its backward (the outputs' autograd node holds the
        region until the graph goes: a region that kept its inputs leaked them each step, seen by
        moetron.core.saved_tensors on a pipeline)."""
        self.fn, self.meta = None, None
        self.kept, self.storages = (), ()
        self.recomputed_outputs = self.recomputed_inputs = None

    def recompute_now(self) -> None:
        kept = self.kept if self.keep is None else self.keep.unpack(self.kept, self.meta)
        inputs = tuple(inp.detach().requires_grad_(grad) for inp, grad in zip(kept, self.needs_grad))
        with torch.enable_grad():
            outputs = self.fn(*inputs)
        self.recomputed_inputs = inputs
        self.recomputed_outputs = outputs if isinstance(outputs, tuple) else (outputs,)

    def _refill(self, grad: torch.Tensor) -> None:
        self.recompute_now()
        for freed, fresh in zip(self.storages, self.recomputed_outputs):
            storage = fresh.untyped_storage()
            freed.resize_(storage.size())
            freed.copy_(storage)


RECOMPUTE_SWITCHES = ("norm", "mla_up_proj", "swiglu")


class SelectiveRecompute:
    """The recompute converter (moetron.core.convert): for each switch on (the report's policy,
    section 3.2.3: `norm`, `mla_up_proj`, `swiglu`), every module with a `recompute_<switch>` slot
    recomputes that part in backward; a problem where no module of the model has the slot."""

    name = "recompute"

    def __init__(self, switches: dict[str, bool]) -> None:
        unknown = sorted(set(switches) - set(RECOMPUTE_SWITCHES))
        if unknown:
            raise ValueError(f"recompute: no switch {unknown}; the switches are {RECOMPUTE_SWITCHES}")
        self.on = [k for k in RECOMPUTE_SWITCHES if switches.get(k)]

    def convert(self, root: nn.Module) -> None:
        for module in root.modules():
            for switch in self.on:
                if hasattr(module, f"recompute_{switch}"):
                    setattr(module, f"recompute_{switch}", True)

    def problems(self, root: nn.Module) -> list[str]:
        return [f"recompute.{s}=true, but no layer of this model can recompute its {s}" for s in self.on
                if not any(hasattr(m, f"recompute_{s}") for m in root.modules())]


def maybe_recompute(enabled: bool, fn: Callable, *inputs: torch.Tensor, keep=None):
    """Run `fn(*inputs)`; when `enabled` and building a graph, return `(outputs, region)` whose
    `region.discard(after=...)` frees the outputs (`keep`: how the region keeps its inputs, see
    OutputRecompute). Otherwise `(outputs, None)`."""
    if not (enabled and torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return fn(*inputs), None
    region = OutputRecompute(keep)
    return region.run(fn, *inputs), region


def discard_all(regions, after: torch.Tensor) -> None:
    """Call `discard(after)` on every region that is not None."""
    for region in regions:
        if region is not None:
            region.discard(after)
