"""Weight gradients a pipeline B action defers to a later W action (zero-bubble's B/W split).

Any layer whose backward computes a weight gradient defers it the one way, `defer_or_compute(store,
param, compute)`: with the store enabled (a B action) the gradient is queued and a W action adds it
to `param.grad` in place (or to its float32 `main_grad`, moetron.parallel.grad_buffer); otherwise it is returned to autograd. The pipeline runtime enables the
store; `moetron.parallel.weight_grads` hands it to the layers. It lives below every package that
defines layers (precision, parallel, models), so each of them uses it.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import torch


class WeightGradStore:
    """Weight-gradient closures deferred by B actions, released in order by W actions.
    `on_accumulated(param)` (optional) hears of every gradient a W action adds to a parameter, as
    autograd's post-accumulate hooks hear of the others (the gradient buffer counts them)."""

    def __init__(self) -> None:
        self.enabled = False
        self.on_accumulated: Optional[Callable[[torch.Tensor], None]] = None
        self._current: list[Callable[[], None]] = []
        self._queue: deque = deque()

    @torch.no_grad()
    def accumulate(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """param.grad += grad, in place (param.grad may be a view of a gradient buffer; where the
        buffer keeps a higher precision than param, its `main_grad`). The gradient is rounded to
        param's dtype first, as autograd rounds the gradients it accumulates."""
        grad = grad.to(param.dtype)
        main = getattr(param, "main_grad", None)
        if main is not None:
            main.add_(grad)
        elif param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)
        if self.on_accumulated is not None:
            self.on_accumulated(param)

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


def defer_or_compute(store: Optional[WeightGradStore], param: Optional[torch.Tensor],
                     compute: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
    """The one way a layer defers a weight gradient: with `store` enabled (a pipeline B action),
    queue `compute` for the W action, which adds its result to `param.grad` (or `main_grad`), and
    return None (no gradient flows back now); otherwise return `compute()` for autograd to
    accumulate. `param`: the parameter the gradient belongs to (None: not a parameter, computed now)."""
    if store is None or not store.enabled or param is None:
        return compute()

    @torch.no_grad()
    def accumulate() -> None:
        store.accumulate(param, compute())

    store.put(accumulate)
    return None
