"""Collectives along the sequence for context parallelism: every rank of a context-parallel group
holds some tokens of each sequence, and attention needs what the others hold.

    k_BKTD = gather_sequence(k_BKSD, dim=2, group=cp_group)   # every rank's tokens, rank-major
    # backward: each rank gets the sum, over the ranks, of the gradient of its own tokens

The gather's backward is a reduce-scatter: the keys a rank sent were read by every rank's queries.
`sum_for_mean` sums a statistic over the ranks (a sequence's expert counts and mean affinities for
the sequence-wise balance loss) with the gradient scaled for ranks whose gradients are averaged.

`group` may be a LaneGroup (moetron.comm.lanes): a forward's collectives go over lane 0, a
backward's over lane 1, so that DualPipe's overlapped F&B pairs keep one order per lane. The
collectives run eagerly inside a compiled block (`torch.compiler.disable`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moetron.comm.lanes import GroupLike, issuing, resolve

# torch 2.13 names them *_single (the *_tensor names warn); older torch has only those
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: GroupLike) -> int:
    """Ranks in `group` (a process group, its lanes, or None: the world)."""
    return dist.get_world_size(resolve(group))


def _gather(x: torch.Tensor, dim: int, group: GroupLike) -> torch.Tensor:
    front = x.movedim(dim, 0).contiguous()
    with issuing(group) as process_group:
        out = front.new_empty((dist.get_world_size(process_group) * front.shape[0], *front.shape[1:]))
        all_gather_single(out, front, group=process_group)
    return out.movedim(0, dim)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim: int, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        front = grad.movedim(ctx.dim, 0).contiguous()
        with issuing(ctx.group) as process_group:
            mine = front.new_empty((front.shape[0] // dist.get_world_size(process_group), *front.shape[1:]))
            reduce_scatter_single(mine, front, group=process_group)  # the sum over the ranks that read them
        return mine.movedim(0, ctx.dim), None, None


@torch.compiler.disable
def gather_sequence(x: torch.Tensor, dim: int, group: GroupLike) -> torch.Tensor:
    """Every rank's `x` joined along `dim` in rank order (autograd: the backward reduce-scatters)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherSequence.apply(x, dim, group)
    return _gather(x, dim, group)


class _SumForMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return sum_over(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad * group_size(ctx.group), None


@torch.compiler.disable
def sum_over(x: torch.Tensor, group: GroupLike) -> torch.Tensor:
    """`x` summed over the ranks of `group`, in place, without a gradient."""
    with issuing(group) as process_group:
        dist.all_reduce(x, group=process_group)
    return x


@torch.compiler.disable
def sum_for_mean(x: torch.Tensor, group: GroupLike) -> torch.Tensor:
    """The sum of `x` over the ranks of `group`, for a term every rank then computes alike and whose
    gradients the ranks average afterwards (as data-parallel ranks do): the backward hands each rank
    the world size times the gradient, so that the average is the gradient of the whole."""
    return _SumForMean.apply(x, group)
