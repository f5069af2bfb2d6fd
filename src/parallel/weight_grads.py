"""Weight gradients a pipeline B action defers to a later W action (zero-bubble's B/W split).

`defer_weight_grads(module, store)` is a module converter (`moetron.core.convert`): it
replaces every nn.Linear of `module` by a DeferrableLinear sharing its parameters, and hands
`store` to every layer that declares a `weight_grad_store` slot (grouped experts do). While
`store.enabled`, their backward computes the input gradient and queues the weight gradient as a
closure; `close_batch` ends one B action's batch and `run_oldest` (a W action) runs it.
`parallelize` applies it when a pipeline runs; the pipeline runtime is handed the store.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetron.core.convert import replace_modules
from moetron.core.weight_grads import WeightGradStore, defer_or_compute


class _DeferrableLinearFn(torch.autograd.Function):
    """F.linear whose backward queues the weight (and bias) gradient while the store is enabled.

    Under autocast F.linear computes in the autocast dtype; the backward does its products in the
    dtype of the incoming gradient, as autograd does on autocast's cast copies, and the gradients
    reach the parameters in their own dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x)
        ctx.weight, ctx.bias, ctx.store = weight, bias, store
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        dtype = grad_out.dtype
        grad_x = grad_out @ weight.to(dtype) if ctx.needs_input_grad[0] else None

        g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = defer_or_compute(ctx.store, weight, lambda: g2.t() @ x2.to(dtype))
        grad_b = defer_or_compute(ctx.store, bias, lambda: g2.sum(0)) if bias is not None else None
        return grad_x, grad_w, grad_b, None


class DeferrableLinear(nn.Linear):
    """nn.Linear whose weight gradient a pipeline B action may defer to a later W action."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 store: Optional[WeightGradStore] = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_grad_store = store

    @classmethod
    def from_linear(cls, linear: nn.Linear, store: WeightGradStore) -> "DeferrableLinear":
        """A DeferrableLinear holding `linear`'s own parameters (not copies)."""
        new = cls(linear.in_features, linear.out_features, bias=False, store=store, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_grad_store is None or not torch.is_grad_enabled():
            return super().forward(x)
        return _DeferrableLinearFn.apply(x, self.weight, self.bias, self.weight_grad_store)


def defer_weight_grads(module: nn.Module, store: WeightGradStore) -> nn.Module:
    """Replace every nn.Linear inside `module` by a DeferrableLinear on the same parameters, and
    hand `store` to every layer with a `weight_grad_store` slot (e.g. grouped experts)."""
    replace_modules(module, lambda m: type(m) is nn.Linear, lambda m: DeferrableLinear.from_linear(m, store))
    for m in module.modules():
        if hasattr(m, "weight_grad_store"):
            m.weight_grad_store = store
    return module


class WeightGradDeferral:
    """The weight-gradient converter (moetron.core.convert): `defer_weight_grads` on the module
    `scope(root)` gives; a problem for every layer there that computes its weight gradient in the
    backward and cannot hand it to a W action (it declares `DEFERS_WEIGHT_GRADS = False`, as
    transformer-engine's linears do)."""

    name = "defer_weight_grads"

    def __init__(self, store: WeightGradStore, scope: Callable[[nn.Module], nn.Module]) -> None:
        self.store, self.scope = store, scope

    def convert(self, root: nn.Module) -> None:
        defer_weight_grads(self.scope(root), self.store)

    def problems(self, root: nn.Module) -> list[str]:
        return [f"{name} ({type(m).__name__}) computes its weight gradient in the backward: a W action cannot "
                "defer it" for name, m in self.scope(root).named_modules()
                if getattr(type(m), "DEFERS_WEIGHT_GRADS", True) is False]


def deferred_parameters(module: nn.Module, store: Optional[WeightGradStore]) -> frozenset[int]:
    """Ids of the parameters of `module` whose weight gradients a B action defers to `store` (ask
    after every swap: expert parallelism replaces the expert stacks with their shards)."""
    if store is None:
        return frozenset()
    return frozenset(id(p) for m in module.modules() if getattr(m, "weight_grad_store", None) is store
                     for p in m.parameters(recurse=False))
