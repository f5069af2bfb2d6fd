"""When a pipeline rank's gradients are final: the action after which a parameter gets no more
gradient in the step, so its bucket's reduction may start while the schedule goes on.

A stage's parameters get gradients from its backward actions: `BW` and the backward half of `FB`
add every gradient; `B` adds all but the weight gradients it defers (the layers the weight-gradient
converter reached), which the stage's `W` actions add later. A parameter's last gradient therefore
comes from the last action of a stage holding it that adds its kind of gradient (the later one,
where two stages on the rank hold it: an embedding a loss tail reads on the same rank).
"""
from __future__ import annotations

from typing import Sequence

from moetron.pipeline.schedule import Action, ActionKind

K = ActionKind


def _backward_stage(a: Action) -> int:
    return a.stage2 if a.kind == K.FB else a.stage


def final_gradient_actions(actions: Sequence[Action], stage_params: dict[int, list],
                           deferred: set[int]) -> dict[int, list]:
    """Index in `actions` -> the parameters whose gradients are complete once that action has run.
    `stage_params`: stage -> this rank's parameters it runs (in the order a backward finishes them:
    reversed model order); `deferred`: ids of parameters whose weight gradient a B defers."""
    last: dict[int, tuple[int, int, object]] = {}  # id(param) -> (action index, position, param)
    for i, a in enumerate(actions):
        if a.kind not in (K.B, K.BW, K.FB, K.W):
            continue
        for position, p in enumerate(stage_params.get(_backward_stage(a), [])):
            is_deferred = id(p) in deferred
            if (a.kind == K.W and not is_deferred) or (a.kind == K.B and is_deferred):
                continue  # a W adds deferred gradients only; a B all others
            last[id(p)] = (i, position, p)
    out: dict[int, list] = {}
    for i, _, p in sorted(last.values(), key=lambda t: t[:2]):
        out.setdefault(i, []).append(p)
    return out


def gradient_order(actions: Sequence[Action], stage_params: dict[int, list], deferred: set[int]) -> list:
    """This rank's parameters in the order their gradients become final (the gradient buffers'
    bucket order)."""
    return [p for params in final_gradient_actions(actions, stage_params, deferred).values() for p in params]
