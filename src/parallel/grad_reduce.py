"""Sums, norms and clipping on gradients that the gradient buffers (moetron.parallel.grad_buffer)
have reduced over data- and expert-parallel ranks.

The objective is the mean of the per-rank losses over the dp x ep x cp ranks of a stage; a parameter
held by several pipeline ranks (DualPipe's mirrors, the embedding a loss tail reads) sums its
gradients over them, and counts once in the whole model's norm.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def _all_reduce_flat(grads: Sequence[torch.Tensor], group: Optional[dist.ProcessGroup]) -> None:
    """Sum `grads` over `group` in one all-reduce (copied into one flat tensor and back)."""
    if not grads or group is None:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_shared_gradients(shared: dict[tuple[int, ...], list[torch.Tensor]], groups: dict) -> None:
    """Gradients of parameters held by several pipeline ranks (pipeline-rank set -> this rank's
    gradients of them, in model order), summed over those ranks."""
    for pp_set, grads in shared.items():
        _all_reduce_flat(grads, groups[pp_set])


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
