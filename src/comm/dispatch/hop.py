"""One hop of a dispatch: send each row once to every destination that holds one of its experts.

A row carries its K expert ids (-1 for slots that are not the destination's) and its K gates, so
the receiver knows which of its experts the row is for. `plan_hop` is the pure layout step (also
used by the traffic benchmark without any process group); `send_hop` runs it, `return_hop` brings
per-row partial outputs back and sums them per source row (the combine direction).

Shape legend: R source rows, K slots (experts per token), D destinations, N rows sent, M rows
received, H hidden.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from moetron.comm.a2a import all_to_all, all_to_all_packed, exchange_counts
from moetron.comm.counts import count_per_expert
from moetron.comm.lanes import GroupLike
from moetron.comm.traffic import TrafficCounter


class IdentityCodec:
    """The payload codec hook: how token rows travel in the dispatch direction, and gradients in the
    combine's backward (the combine's outputs travel as they are). `exchange` sends rows
    x[sum(send[:p]) : ...] to peer p and returns the rows received, differentiable in x; `send_back`
    is the combine's exchange; `bytes_per_row` is what one row costs on the wire. Identity sends the
    rows as they are; FP8 dispatch (moetron.precision.fp8_dispatch) sends E4M3 tiles and scales."""

    def exchange(self, x_NH: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        return all_to_all(x_NH, send, recv, group)

    def send_back(self, y_MH: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        return all_to_all(y_MH, send, recv, group)

    def round_trip(self, x_NH: torch.Tensor) -> torch.Tensor:
        """The rows as a peer would receive them (the local dispatcher's view, so that EP = 1 agrees)."""
        return x_NH

    def round_trip_grad(self, y_NH: torch.Tensor) -> torch.Tensor:
        """The combined rows, whose gradient reaches the experts as `send_back` would deliver it."""
        return y_NH

    def bytes_per_row(self, x_NH: torch.Tensor) -> int:
        return x_NH.shape[-1] * x_NH.element_size()


@dataclass
class HopPlan:
    """Where rows go, before the host knows how many: `mask_RD` marks (row, destination) pairs,
    `dest_RK` each slot's destination (num_dest for an invalid slot)."""
    mask_RD: torch.Tensor
    dest_RK: torch.Tensor
    send_counts_D: torch.Tensor  # int64: rows per destination
    pair_counts_D: torch.Tensor  # int64: valid slots (token-expert pairs) per destination


def plan_hop(expert_RK: torch.Tensor, dest_RK: torch.Tensor, num_dest: int) -> HopPlan:
    """Rows to send where: row r goes once to each destination some valid slot of r maps to."""
    R = expert_RK.shape[0]
    dest_RK = torch.where(expert_RK >= 0, dest_RK, num_dest)  # invalid slots -> a dropped column
    mask_RD = torch.zeros(R, num_dest + 1, dtype=torch.bool, device=expert_RK.device)
    mask_RD.scatter_(1, dest_RK, True)
    mask_RD = mask_RD[:, :num_dest]
    pairs_D = count_per_expert(dest_RK, num_dest + 1)[:num_dest]
    return HopPlan(mask_RD, dest_RK, mask_RD.sum(dim=0), pairs_D)


def rows_to_send(plan: HopPlan, expert_RK: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source row of each sent row, grouped by destination; the expert ids of its slots at that
    destination, -1 elsewhere), with the row count known on the host: no sync of its own."""
    dest_N, row_N = torch.nonzero_static(plan.mask_RD.t(), size=total).unbind(1)  # by destination, then row
    keep_NK = plan.dest_RK.index_select(0, row_N) == dest_N.unsqueeze(1)
    return row_N, torch.where(keep_NK, expert_RK.index_select(0, row_N), -1)


@dataclass
class Hop:
    row_idx_N: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    group: GroupLike
    num_rows: int
    links: Sequence[Optional[str]]
    recv_pairs: int = 0  # valid slots among the received rows


def send_hop(x_RH, expert_RK, weight_RK, dest_RK, num_dest: int, group, links: Sequence[Optional[str]],
             codec: IdentityCodec, traffic: TrafficCounter):
    """Exchange rows; returns (x_MH, expert_MK, weight_MK, Hop). Differentiable in x and weight.
    The host reads the exchanged counts once (rows and pairs per peer): the hop's one sync."""
    plan = plan_hop(expert_RK, dest_RK, num_dest)
    counts_D2 = torch.stack([plan.send_counts_D, plan.pair_counts_D], dim=1)
    sent, received = torch.stack([counts_D2, exchange_counts(counts_D2, group)]).tolist()  # one sync
    send, recv = [rows for rows, _ in sent], [rows for rows, _ in received]
    row_N, sent_expert_NK = rows_to_send(plan, expert_RK, sum(send))
    x_NH = x_RH.index_select(0, row_N)
    x_MH = codec.exchange(x_NH, send, recv, group)
    # gates and expert ids in one exchange (packing the rows too would copy the payload once more)
    weight_MK, expert_MK = all_to_all_packed([weight_RK.index_select(0, row_N), sent_expert_NK], send, recv, group)
    K = expert_RK.shape[1]
    row_bytes = codec.bytes_per_row(x_NH) + K * (weight_RK.element_size() + expert_RK.element_size())
    traffic.add(send, row_bytes, links)
    hop = Hop(row_N, send, recv, group, x_RH.shape[0], links, sum(pairs for _, pairs in received))
    return x_MH, expert_MK, weight_MK, hop


def return_hop(y_MH: torch.Tensor, hop: Hop, codec: IdentityCodec, traffic: TrafficCounter) -> torch.Tensor:
    """Send partial outputs back along `hop` (their gradients come back as `codec` sends them) and
    sum them per source row -> y_RH."""
    y_NH = codec.send_back(y_MH, hop.recv_splits, hop.send_splits, hop.group)
    traffic.add(hop.recv_splits, y_MH.shape[-1] * y_MH.element_size(), hop.links)
    return y_NH.new_zeros(hop.num_rows, y_NH.shape[-1]).index_add(0, hop.row_idx_N, y_NH)
