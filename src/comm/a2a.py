"""Differentiable all-to-all with uneven splits, on a process group handed in.

`exchange_counts` tells every rank how many rows it will receive from each peer (the counts go
first, as the payload sizes must be known before the exchange). `all_to_all` moves rows: the
gradient of an all-to-all is the all-to-all back with the splits swapped. With `async_op=True` the
forward returns at once with a handle whose `wait()` must run before the output is read, so a
caller can compute while the exchange is in flight. gloo and NCCL both accept uneven splits in
`all_to_all_single` (the list form rejects them on gloo). `group` may be a `LaneGroup`
(moetron.comm.lanes): each exchange, forward or backward, uses the calling thread's lane, in its
turn where the group is ordered.

Shape legend: N rows sent, M rows received, F feature dims of a row.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moetron.comm.lanes import GroupLike, issuing


def exchange_counts(send_counts: torch.Tensor, group: GroupLike) -> torch.Tensor:
    """Rows each peer will send me, given the rows I send each peer (int64 [group size])."""
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
