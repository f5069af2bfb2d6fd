"""Collectives along the sequence for context parallelism: every rank of a context-parallel group
holds some tokens of each sequence, and attention needs what the others hold.

    k_BKTD = gather_sequence(k_BKSD, dim=2, group=cp_group)   # every rank's tokens, rank-major
    # backward: each rank gets the sum, over the ranks, of the gradient of its own tokens

The gather's backward is a reduce-scatter: the keys a rank sent were read by every rank's queries.
`sum_for_mean` sums a statistic over the ranks (a sequence's expert counts and mean affinities for
the sequence-wise balance loss) with the gradient scaled for ranks whose gradients are averaged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((world * front.shape[0], *front.shape[1:]))
    dist.all_gather_into_tensor(out, front, group=group)
    return out.movedim(0, dim)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim: int, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        front = grad.movedim(ctx.dim, 0).contiguous()
        mine = front.new_empty((front.shape[0] // world, *front.shape[1:]))
        dist.reduce_scatter_tensor(mine, front, group=ctx.group)  # the sum over the ranks that read them
        return mine.movedim(0, ctx.dim), None, None


def gather_sequence(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's `x` joined along `dim` in rank order (autograd: the backward reduce-scatters)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherSequence.apply(x, dim, group)
    return _gather(x, dim, group)


class _SumForMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad * dist.get_world_size(ctx.group), None


def sum_for_mean(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of `x` over the ranks of `group`, for a term every rank then computes alike and whose
    gradients the ranks average afterwards (as data-parallel ranks do): the backward hands each rank
    the world size times the gradient, so that the average is the gradient of the whole."""
    return _SumForMean.apply(x, group)
