"""Gradient reduction and clipping across data- and expert-parallel ranks.

The objective is the mean of the per-rank losses over the dp x ep ranks of a stage. Replicated
parameters (attention, dense, shared experts, routers) sum their gradients over the dp x ep group;
an EP rank's experts already received the gradients of every EP peer's tokens through the
all-to-all, so expert gradients sum over the expert-data-parallel group only. Both divide by dp x ep.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def _all_reduce_flat(grads: Sequence[torch.Tensor], group: Optional[dist.ProcessGroup], scale: float) -> None:
    if not grads:
        return
    if group is None:
        if scale != 1.0:
            torch._foreach_mul_(list(grads), scale)
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_gradients(replicated, experts, dp_ep_group, edp_group, data_ranks: int) -> None:
    """Average gradients into d(mean loss over the stage's dp x ep data ranks)/d(param)."""
    scale = 1.0 / data_ranks
    _all_reduce_flat([p.grad for p in replicated if p.grad is not None], dp_ep_group, scale)
    _all_reduce_flat([p.grad for p in experts if p.grad is not None], edp_group, scale)


def sum_shared_gradients(shared: dict[tuple[int, ...], list], groups: dict) -> None:
    """Parameters held by several pipeline ranks (DualPipe's mirrored stages, the embedding the MTP
    tail reads on another rank) sum their gradients over those ranks; a holder without a gradient
    contributes zeros."""
    for pp_set, params in shared.items():
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _all_reduce_flat([p.grad for p in params], groups[pp_set], 1.0)


def squared_norm(grads_and_copies: Sequence[tuple[torch.Tensor, int]], device: torch.device) -> torch.Tensor:
    """Sum of squares of the gradients, each divided by the number of pipeline ranks holding its
    parameter (so that the pipeline's sum counts it once); on `device` (NCCL reduces device tensors)."""
    # squares summed in float64 (a float32 sum of millions of squares drifts by 1e-6: ZeRO-1's shards and
    # the whole gradients then disagree), a chunk at a time so no gradient is copied whole
    terms = [sum(chunk.double().pow(2).sum() for chunk in grad.detach().reshape(-1).split(1 << 24)) / copies
             for grad, copies in grads_and_copies if grad.numel()]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64, device=device)


def clip_by_global_norm(replicated_sq: torch.Tensor, expert_sq: torch.Tensor, grads: Sequence[torch.Tensor],
                        max_norm: float, ep_group: Optional[dist.ProcessGroup],
                        pp_group: Optional[dist.ProcessGroup]) -> float:
    """The whole model's gradient norm from this rank's squared parts: the expert part summed over
    the EP group, the total over the pipeline; `grads` scaled in place when it exceeds `max_norm`
    (0: never), by the same factor on every rank. Returns the norm."""
    if ep_group is not None:
        dist.all_reduce(expert_sq, group=ep_group)
    total_sq = replicated_sq + expert_sq
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = math.sqrt(float(total_sq))
    if max_norm > 0 and total > max_norm:
        torch._foreach_mul_(list(grads), max_norm / (total + 1e-6))
    return total


def clip_grad_norm(replicated, experts, max_norm: float, ep_group: Optional[dist.ProcessGroup],
                   pp_group: Optional[dist.ProcessGroup] = None, copies: Optional[dict] = None) -> float:
    """Clip by the norm of the whole model's gradient (after `reduce_gradients`: every rank of the
    expert-data-parallel group holds the same expert gradients); a parameter held by n pipeline
    ranks counts 1/n on each, `copies[id(p)] = n`."""
    copies = copies or {}
    device = next((p.device for p in [*replicated, *experts]), torch.device("cpu"))

    def parts(params):
        return [(p.grad, copies.get(id(p), 1)) for p in params if p.grad is not None]

    grads = [p.grad for p in (*replicated, *experts) if p.grad is not None]
    return clip_by_global_norm(squared_norm(parts(replicated), device), squared_norm(parts(experts), device), grads,
                               max_norm, ep_group, pp_group)
