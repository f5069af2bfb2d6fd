"""Expert-parallel dispatchers: routed experts sharded over the EP group, tokens moved by all-to-all.

EP rank e holds experts [e * L, (e + 1) * L) (L = experts / ep). Both dispatchers move each token
row at most once per destination, with its K expert ids and gates, then expand the received rows to
one row per (token, local expert), grouped by local expert; combine weights the expert outputs,
sums them per received row, and sends the partial sums back the way they came.

- `AllToAllDispatcher`: one hop over the EP group (each token once per destination rank).
- `HierarchicalDispatcher` (report section 3.2.2): hop 1 over InfiniBand to the rank with my local
  index on each destination node (each token once per node), hop 2 over NVLink to the ranks of that
  node holding its experts. Combine sums the partial outputs inside the node before they cross the
  inter-node link back.

Shape legend: T tokens, H hidden, K experts per token, M rows received, S (row, local expert)
pairs, L local experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moetron.comm.counts import count_per_expert
from moetron.comm.dispatch.hop import IdentityCodec, return_hop, send_hop
from moetron.comm.dispatch.rows import scale_rows, sum_rows
from moetron.comm.lanes import GroupLike
from moetron.comm.traffic import TrafficCounter


@dataclass
class EPDispatchHandle:
    hops: list  # what `_bring_back` needs: the Hops taken, or a backend's own handle
    row_of_pair_S: torch.Tensor  # received row of each (row, local expert) pair
    weight_S: torch.Tensor  # its gate
    num_rows: int


class ExpertParallelDispatcher:
    def __init__(self, num_experts: int, ep_rank: int, ep_size: int, codec=None,
                 traffic: Optional[TrafficCounter] = None) -> None:
        self.num_local = num_experts // ep_size
        self.first_local = ep_rank * self.num_local
        self.ep_size = ep_size
        self.codec = codec or IdentityCodec()
        self.traffic = traffic or TrafficCounter()

    def _send(self, x_TH, topk_idx_TK, topk_weight_TK):  # -> x_MH, expert_MK, weight_MK, hops
        raise NotImplementedError

    def _received_pairs(self, hops) -> Optional[int]:
        """Valid (row, slot) pairs received, when the exchange told the host (None: count them)."""
        return hops[-1].recv_pairs

    def dispatch(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor):
        x_MH, expert_MK, weight_MK, hops = self._send(x_TH, topk_idx_TK, topk_weight_TK)
        pairs, valid_MK = self._received_pairs(hops), expert_MK >= 0
        # the valid slots' count came with the last hop's counts: no sync of its own
        row_S, slot_S = (valid_MK.nonzero() if pairs is None else torch.nonzero_static(valid_MK, size=pairs)).unbind(1)
        local_S = expert_MK[row_S, slot_S] - self.first_local
        order_S = torch.argsort(local_S, stable=True)
        row_S, slot_S, local_S = row_S[order_S], slot_S[order_S], local_S[order_S]
        tokens_per_local_expert_L = count_per_expert(local_S, self.num_local)
        handle = EPDispatchHandle(hops, row_S, weight_MK[row_S, slot_S], x_MH.shape[0])
        return x_MH.index_select(0, row_S), tokens_per_local_expert_L, handle

    def combine(self, y_SH: torch.Tensor, handle: EPDispatchHandle, weighted: bool = True) -> torch.Tensor:
        """Rows weighted by their gates (unless `weighted` is False: the experts applied them), summed
        per received row, then sent back the way they came."""
        rows_SH = scale_rows(y_SH, handle.weight_S) if weighted else y_SH
        return self._bring_back(sum_rows(rows_SH, handle.row_of_pair_S, handle.num_rows), handle.hops)

    def _bring_back(self, y_MH, hops):  # -> y_TH: partial sums per received row, back along the hops
        for hop in reversed(hops):
            y_MH = return_hop(y_MH, hop, self.codec, self.traffic)
        return y_MH


class AllToAllDispatcher(ExpertParallelDispatcher):
    """Flat: every destination rank of the EP group gets each of its tokens once."""

    def __init__(self, num_experts: int, ep_rank: int, ep_size: int, ep_group: GroupLike,
                 node_of_ep_rank: list[int], **kwargs) -> None:
        super().__init__(num_experts, ep_rank, ep_size, **kwargs)
        self.group = ep_group
        me = node_of_ep_rank[ep_rank]
        self.links = [None if d == ep_rank else ("nvlink" if node == me else "ib")
                      for d, node in enumerate(node_of_ep_rank)]

    def _send(self, x_TH, topk_idx_TK, topk_weight_TK):
        dest_TK = topk_idx_TK // self.num_local
        x_MH, expert_MK, weight_MK, hop = send_hop(x_TH, topk_idx_TK, topk_weight_TK, dest_TK, self.ep_size,
                                                   self.group, self.links, self.codec, self.traffic)
        return x_MH, expert_MK, weight_MK, [hop]


class HierarchicalDispatcher(ExpertParallelDispatcher):
    """Two hops: inter-node among same-local-index ranks (once per node), then intra-node fan-out.
    A hop with a single destination (one node; one EP rank per node) is skipped.

    `ranks_per_node` is the EP group's ranks on one node; `ib_group` holds my local index on each of
    the EP group's nodes (ordered by node), `nvl_group` the EP ranks of my node (ordered by local index).
    """

    def __init__(self, num_experts: int, ep_rank: int, ep_size: int, ranks_per_node: int,
                 ib_group: GroupLike, nvl_group: GroupLike, **kwargs) -> None:
        super().__init__(num_experts, ep_rank, ep_size, **kwargs)
        self.per_node = ranks_per_node
        self.num_nodes = ep_size // ranks_per_node
        self.ib_group, self.nvl_group = ib_group, nvl_group
        my_node, my_local = divmod(ep_rank, ranks_per_node)
        self.ib_links = [None if n == my_node else "ib" for n in range(self.num_nodes)]
        self.nvl_links = [None if r == my_local else "nvlink" for r in range(ranks_per_node)]

    def _send(self, x_TH, topk_idx_TK, topk_weight_TK):
        x_MH, expert_MK, weight_MK, hops = x_TH, topk_idx_TK, topk_weight_TK, []
        if self.num_nodes > 1:  # one node: no inter-node hop (it would only copy every row to itself)
            node_MK = topk_idx_TK // self.num_local // self.per_node
            x_MH, expert_MK, weight_MK, ib_hop = send_hop(x_MH, expert_MK, weight_MK, node_MK, self.num_nodes,
                                                          self.ib_group, self.ib_links, self.codec, self.traffic)
            hops.append(ib_hop)
        if self.per_node > 1:  # one EP rank per node: the inter-node hop has already landed every row
            local_MK = expert_MK.clamp(min=0) // self.num_local % self.per_node
            x_MH, expert_MK, weight_MK, nvl_hop = send_hop(x_MH, expert_MK, weight_MK, local_MK, self.per_node,
                                                           self.nvl_group, self.nvl_links, self.codec, self.traffic)
            hops.append(nvl_hop)
        return x_MH, expert_MK, weight_MK, hops
