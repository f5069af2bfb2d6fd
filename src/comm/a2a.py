"""Differentiable all-to-all with uneven splits, on a process group handed in.

`exchange_counts` tells every rank how many rows it will receive from each peer (the counts go
first, as the payload sizes must be known before the exchange). `all_to_all` moves rows: the
gradient of an all-to-all is the all-to-all back with the splits swapped. With `async_op=True` the
forward returns at once with a handle whose `wait()` must run before the output is read, so a
caller can compute while the exchange is in flight. `all_to_all_packed` moves several row-aligned
tensors of any dtypes (token rows, gates, expert ids) as one exchange of their bytes, and their
gradients back as one. gloo and NCCL both accept uneven splits in
`all_to_all_single` (the list form rejects them on gloo). `group` may be a `LaneGroup`
(moetron.comm.lanes): each exchange, forward or backward, uses the calling thread's lane, in its
turn where the group is ordered.

Shape legend: N rows sent, M rows received, F feature dims of a row.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moetron.comm.lanes import GroupLike, issuing


def exchange_counts(send_counts: torch.Tensor, group: GroupLike) -> torch.Tensor:
    """Rows each peer will send me, given the rows I send each peer (int64 [group size], or
    [group size, n]: n counts per peer)."""
    with issuing(group) as process_group:
        if process_group is None:
            return send_counts.clone()
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=process_group)
    return recv_counts


class PendingAllToAll:
    """The handle of an asynchronous exchange; `wait()` returns the received rows."""

    def __init__(self, output: torch.Tensor, work) -> None:
        self.output, self.work = output, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.output


def _exchange(x_NF: torch.Tensor, send_splits: list[int], recv_splits: list[int], group, async_op: bool):
    out_MF = x_NF.new_empty((sum(recv_splits), *x_NF.shape[1:]))
    with issuing(group) as process_group:  # the calling thread's lane, also when called from backward
        if process_group is None:
            out_MF.copy_(x_NF)
            return out_MF, None
        work = dist.all_to_all_single(out_MF, x_NF.contiguous(), output_split_sizes=recv_splits,
                                      input_split_sizes=send_splits, group=process_group, async_op=async_op)
    return out_MF, work


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NF, send_splits, recv_splits, group, pending_box):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out_MF, work = _exchange(x_NF, send_splits, recv_splits, group, async_op=pending_box is not None)
        if pending_box is not None:
            pending_box.append(work)
        return out_MF

    @staticmethod
    def backward(ctx, grad_MF):
        grad_NF, _ = _exchange(grad_MF.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group, async_op=False)
        return grad_NF, None, None, None, None


def all_to_all(x_NF: torch.Tensor, send_splits: list[int], recv_splits: list[int],
               group: GroupLike, async_op: bool = False):
    """Send rows x[sum(send_splits[:p]) : ...] to peer p; receive recv_splits[p] rows from p.

    Differentiable in x. Returns the received rows, or a PendingAllToAll when `async_op`.
    """
    if not async_op:
        return _AllToAll.apply(x_NF, send_splits, recv_splits, group, None)
    box: list = []
    out_MF = _AllToAll.apply(x_NF, send_splits, recv_splits, group, box)
    return PendingAllToAll(out_MF, box[0])


def _row_bytes(t_N: torch.Tensor) -> torch.Tensor:
    """[N, ...] of any dtype as [N, bytes of a row] uint8."""
    return t_N.contiguous().reshape(t_N.shape[0], math.prod(t_N.shape[1:])).view(torch.uint8)


def _unpack(packed_MB: torch.Tensor, layouts: list) -> list[torch.Tensor]:
    """Split [M, bytes] rows back into tensors of the given (dtype, row shape)."""
    parts, start = [], 0
    for dtype, row_shape in layouts:
        width = dtype.itemsize * math.prod(row_shape)
        rows = packed_MB[:, start:start + width].contiguous().view(dtype)
        parts.append(rows.view(packed_MB.shape[0], *row_shape))
        start += width
    return parts


def _packed_exchange(parts: list[torch.Tensor], send_splits: list[int], recv_splits: list[int], group):
    packed_NB = torch.cat([_row_bytes(part) for part in parts], dim=1)
    out_MB, _ = _exchange(packed_NB, send_splits, recv_splits, group, async_op=False)
    return _unpack(out_MB, [(part.dtype, part.shape[1:]) for part in parts])


class _PackedAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, send_splits, recv_splits, group, *parts_N):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        ctx.layouts, ctx.device = [(part.dtype, part.shape[1:]) for part in parts_N], parts_N[0].device
        parts_M = _packed_exchange(list(parts_N), send_splits, recv_splits, group)
        ctx.mark_non_differentiable(*[p for p in parts_M if not p.is_floating_point()])
        return tuple(parts_M)

    @staticmethod
    def backward(ctx, *grads_M):
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[3:]) if needed]
        rows = sum(ctx.recv_splits)
        sent = [grads_M[i] if grads_M[i] is not None else
                torch.zeros(rows, *ctx.layouts[i][1], dtype=ctx.layouts[i][0], device=ctx.device) for i in wanted]
        grads_N = [None] * len(ctx.layouts)
        if sent:
            for i, grad in zip(wanted, _packed_exchange(sent, ctx.recv_splits, ctx.send_splits, ctx.group)):
                grads_N[i] = grad
        return (None, None, None, *grads_N)


def all_to_all_packed(parts_N: list[torch.Tensor], send_splits: list[int], recv_splits: list[int],
                      group: GroupLike) -> list[torch.Tensor]:
    """`all_to_all` of several tensors with the same rows (any dtypes, any row shapes) in one exchange.

    Differentiable in the floating-point parts (their gradients travel back together); integer
    parts arrive as they were sent. Returns the received parts, in order.
    """
    return list(_PackedAllToAll.apply(send_splits, recv_splits, group, *parts_N))
