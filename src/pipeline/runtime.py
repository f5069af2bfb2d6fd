"""Execute one rank's action list with real stage modules and point-to-point transfers.

    runner = PipelineRunner(schedule, rank, stage_modules, group, p2p_shape, dtype)
    losses = runner.step(inputs={mb: x}, targets={mb: y}, loss_fn=...)

`stage_modules[s]` is this rank's module for stage s. A forward receives its input from the
previous stage (over the group when that stage lives on another rank, tagged by micro-batch and
stage so transfers cannot cross), runs the module, keeps (input, output) for backward and sends the
output on; the last stage of a chain applies `loss_fn(output, target) * loss_scale`. `B` back-
propagates to the stage input with the weight gradients of linear and grouped-expert layers queued
in the `WeightGradStore`; `W` runs the oldest queued batch; `BW` does both at once. `FB` runs its forward
then its backward (overlap on separate streams is future work). Transfers are asynchronous; the
step waits for all sends before it returns. `busy_s` (compute, receive waits excluded) and `step_s`
(wall time) of the last step give the measured bubble.

Shape legend: B micro-batch rows, F features.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moetron.pipeline.schedule import Action, Schedule


class WeightGradStore:
    """Weight-gradient closures deferred by B actions, released in order by W actions."""

    def __init__(self) -> None:
        self.enabled = False
        self._current: list[Callable[[], None]] = []
        self._queue: deque = deque()

    def put(self, fn: Callable[[], None]) -> None:
        self._current.append(fn)

    def close_batch(self) -> None:
        self._queue.append(self._current)
        self._current = []

    def run_oldest(self) -> None:
        for fn in self._queue.popleft():
            fn()

    def __len__(self) -> int:
        return len(self._queue)


class _DeferrableLinearFn(torch.autograd.Function):
    """F.linear whose backward queues the weight (and bias) gradient while the store is enabled."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x)
        ctx.weight, ctx.bias, ctx.store = weight, bias, store
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None

        def weight_grads():
            g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
            return g2.t() @ x2, (g2.sum(0) if bias is not None else None)

        if not ctx.store.enabled:
            grad_w, grad_b = weight_grads()
            return grad_x, grad_w, grad_b, None

        @torch.no_grad()
        def accumulate():
            for param, grad in zip((weight, bias), weight_grads()):
                if param is not None:
                    param.grad = grad if param.grad is None else param.grad + grad

        ctx.store.put(accumulate)
        return grad_x, None, None, None


class DeferrableLinear(nn.Linear):
    """nn.Linear whose weight gradient a pipeline B action may defer to a later W action."""

    weight_grad_store: Optional[WeightGradStore] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_grad_store is None or not torch.is_grad_enabled():
            return super().forward(x)
        return _DeferrableLinearFn.apply(x, self.weight, self.bias, self.weight_grad_store)


def enable_weight_deferral(module: nn.Module, store: WeightGradStore) -> nn.Module:
    """Make every nn.Linear inside `module` a DeferrableLinear, and hand `store` to it and to every
    other layer that can defer (those with a `weight_grad_store` attribute, e.g. grouped experts)."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = DeferrableLinear
        if hasattr(m, "weight_grad_store"):
            m.weight_grad_store = store
    return module


class PipelineRunner:
    def __init__(self, schedule: Schedule, rank: int, stage_modules: dict[int, nn.Module],
                 group: Optional[dist.ProcessGroup], p2p_shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 store: Optional[WeightGradStore] = None) -> None:
        self.sched, self.rank, self.modules, self.group = schedule, rank, stage_modules, group
        self.shape, self.dtype = p2p_shape, dtype
        self.store = store or WeightGradStore()
        for module in stage_modules.values():
            enable_weight_deferral(module, self.store)

    # -- transfers -------------------------------------------------------------------------------
    def _tag(self, kind: int, mb: int, stage: int) -> int:
        return (kind * self.sched.num_microbatches + mb) * 4096 + stage

    def _peer(self, stage: int) -> int:
        rank = self.sched.stage_rank[stage]
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _recv(self, kind: int, mb: int, from_stage: int, to_stage: int) -> torch.Tensor:
        buf = torch.empty(self.shape, dtype=self.dtype)
        started = time.perf_counter()
        dist.irecv(buf, src=self._peer(from_stage), group=self.group, tag=self._tag(kind, mb, to_stage)).wait()
        self._waiting_s += time.perf_counter() - started
        return buf

    def _send(self, tensor: torch.Tensor, kind: int, mb: int, to_stage: int) -> None:
        work = dist.isend(tensor.contiguous(), dst=self._peer(to_stage), group=self.group,
                          tag=self._tag(kind, mb, to_stage))
        self._sends.append((work, tensor))

    # -- compute ---------------------------------------------------------------------------------
    def _forward(self, mb: int, stage: int) -> None:
        prev = self.sched.prev_stage(mb, stage)
        if prev is None:
            x = self._inputs[mb]
        elif self.sched.stage_rank[prev] == self.rank:
            x = self._local_acts.pop((mb, stage)).detach()
        else:
            x = self._recv(0, mb, prev, stage)
        x = x.requires_grad_(prev is not None)
        out = self.modules[stage](x)
        nxt = self.sched.next_stage(mb, stage)
        if nxt is None:
            loss = self._loss_fn(out, self._targets[mb])
            self._losses[mb] = loss.detach()
            out = loss * self._loss_scale
        elif self.sched.stage_rank[nxt] == self.rank:
            self._local_acts[(mb, nxt)] = out
        else:
            self._send(out.detach(), 0, mb, nxt)
        self._saved[(mb, stage)] = (x, out)

    def _backward(self, mb: int, stage: int, defer_weights: bool) -> None:
        x, out = self._saved.pop((mb, stage))
        nxt = self.sched.next_stage(mb, stage)
        if nxt is None:
            grad = None
        elif self.sched.stage_rank[nxt] == self.rank:
            grad = self._local_grads.pop((mb, stage))
        else:
            grad = self._recv(1, mb, nxt, stage)
        self.store.enabled = defer_weights
        torch.autograd.backward(out, grad)
        self.store.enabled = False
        if defer_weights:
            self.store.close_batch()
        prev = self.sched.prev_stage(mb, stage)
        if prev is not None:
            if self.sched.stage_rank[prev] == self.rank:
                self._local_grads[(mb, prev)] = x.grad
            else:
                self._send(x.grad, 1, mb, prev)

    def _run(self, a: Action) -> None:
        started, waited = time.perf_counter(), self._waiting_s
        self._dispatch(a)
        self.busy_s += time.perf_counter() - started - (self._waiting_s - waited)

    def _dispatch(self, a: Action) -> None:
        if a.kind == "F":
            self._forward(a.mb, a.stage)
        elif a.kind in ("B", "BW"):
            self._backward(a.mb, a.stage, defer_weights=a.kind == "B")
        elif a.kind == "W":
            self.store.run_oldest()
        else:  # FB: the pair runs one after the other here
            self._forward(a.mb, a.stage)
            self._backward(a.mb2, a.stage2, defer_weights=False)

    def step(self, inputs: dict[int, torch.Tensor], targets: dict[int, torch.Tensor],
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], loss_scale: float = 1.0) -> dict[int, torch.Tensor]:
        """Run this rank's actions for one optimizer step; return {micro-batch: loss} of its last stages."""
        self._inputs, self._targets, self._loss_fn, self._loss_scale = inputs, targets, loss_fn, loss_scale
        self._saved, self._local_acts, self._local_grads, self._losses, self._sends = {}, {}, {}, {}, []
        self.busy_s, self._waiting_s = 0.0, 0.0
        started = time.perf_counter()
        for action in self.sched.actions[self.rank]:
            self._run(action)
        for work, _ in self._sends:
            work.wait()
        self.step_s = time.perf_counter() - started
        assert not self._saved and not len(self.store), "schedule left work undone"
        return self._losses
