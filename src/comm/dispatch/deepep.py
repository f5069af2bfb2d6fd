"""DeepEP (github.com/deepseek-ai/DeepEP) as the token exchange of an expert-parallel dispatcher.

DeepEP's normal (high-throughput) kernels do what `HierarchicalDispatcher` does, fused on the GPU:
each token crosses InfiniBand once per destination node (to the GPU with the same local index) and
fans out over NVLink there; combine sums the partial outputs on the way back. This module only
adapts its `Buffer` API to our dispatcher contract (moetron.comm.dispatch):

- `Buffer.get_dispatch_layout(topk_idx, num_experts)` gives the per-rank/per-node counts and
  `is_token_in_rank [T, ranks]`; `Buffer.dispatch(...)` returns each token once per destination
  rank with its top-k ids made local (-1 where the expert is elsewhere) and its gates, plus an
  opaque handle; `Buffer.combine(y, handle)` sums rows back per token, without weights.
- Backward is the other direction on the same handle: the gradient of dispatch is a combine (the
  gates' gradients ride along as `topk_weights`), the gradient of combine a cached dispatch.
- A buffer must not serve two passes at once, so there is one per lane of the EP group (forward
  lane 0, backward lane 1; see moetron.comm.lanes). Handles hold only layout tensors, so a
  backward on lane 1 reuses the handle its forward made on lane 0.
- DeepEP moves bfloat16 rows: tokens and partial outputs are cast to `wire_dtype` for the exchange
  and back afterwards (autograd casts their gradients alike).

Traffic is counted from the layout on the sending side, as our hierarchical dispatcher moves it:
one row per destination node over InfiniBand, then one per further destination rank over NVLink
(DeepEP's forwarding rank sends those; summed over the group the totals are the same).

Shape legend: T tokens, H hidden, K experts per token, M rows received, D EP ranks.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from moetron.comm.dispatch.ep import ExpertParallelDispatcher
from moetron.comm.lanes import GroupLike, LaneGroup, current_lane, issuing

GPUS_PER_DEEPEP_NODE = 8  # DeepEP's internode kernels assume 8 NVLink peers per node (NUM_MAX_NVL_PEERS)


def deepep_problems(ep_ranks_per_node: int, ep_nodes: int) -> list[str]:
    """What keeps `parallel.dispatcher=deepep` from running here (checked before any process group)."""
    problems = []
    if importlib.util.find_spec("deep_ep") is None:
        problems.append("parallel.dispatcher=deepep needs DeepEP installed (build it on a CUDA machine from "
                        "github.com/deepseek-ai/DeepEP); or use parallel.dispatcher=hierarchical")
    if not torch.cuda.is_available():
        problems.append("parallel.dispatcher=deepep runs on CUDA GPUs only and this machine has none; use "
                        "parallel.dispatcher=hierarchical or alltoall")
    if ep_nodes > 1 and ep_ranks_per_node != GPUS_PER_DEEPEP_NODE:
        problems.append(f"parallel.dispatcher=deepep across nodes needs {GPUS_PER_DEEPEP_NODE} EP ranks per node "
                        f"(DeepEP's internode kernels), the EP group has {ep_ranks_per_node}: set "
                        f"cluster.gpus_per_node={GPUS_PER_DEEPEP_NODE} or use parallel.dispatcher=hierarchical")
    return problems


def load_deep_ep():
    """The `deep_ep` module, or an ImportError that says how to get it."""
    try:
        import deep_ep
    except ImportError as err:
        raise ImportError("parallel.dispatcher=deepep needs DeepEP (github.com/deepseek-ai/DeepEP) built on a CUDA "
                          "machine; use parallel.dispatcher=hierarchical or alltoall") from err
    return deep_ep


class DeepEPBuffers:
    """One `deep_ep.Buffer` per lane of the EP group, made on first use and grown with the hidden size.

    Making a buffer is collective over its group; every EP rank reaches its lane's first exchange
    at the same point of the schedule, so they make it together. Shared by all MoE layers.
    """

    def __init__(self, ep_group: GroupLike, deep_ep=None) -> None:
        self.deep_ep = deep_ep or load_deep_ep()
        self.lanes = ep_group if isinstance(ep_group, LaneGroup) else LaneGroup([ep_group])
        self.made: dict[int, tuple[int, object]] = {}  # lane -> (hidden bytes it was sized for, Buffer)

    @contextmanager
    def issuing(self, hidden_bytes: int) -> Iterator:
        """The calling lane's buffer, for one exchange inside the block (in the lane's turn where the
        EP group is ordered; DeepEP's kernels block like NCCL's, see moetron.comm.lanes)."""
        with issuing(self.lanes) as group:
            lane = min(current_lane(), len(self.lanes.groups) - 1)
            sized, buffer = self.made.get(lane, (0, None))
            if buffer is None or sized < hidden_bytes:
                buffer = self._make(group, hidden_bytes)
                self.made[lane] = (hidden_bytes, buffer)
            yield buffer

    def _make(self, group, hidden_bytes: int):
        Buffer, ranks = self.deep_ep.Buffer, group.size()
        configs = (Buffer.get_dispatch_config(ranks), Buffer.get_combine_config(ranks))
        nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_bytes, ranks) for c in configs)
        rdma_bytes = max(c.get_rdma_buffer_size_hint(hidden_bytes, ranks) for c in configs)
        return Buffer(group, nvl_bytes, rdma_bytes)


def _hidden_bytes(x_NH: torch.Tensor) -> int:
    return x_NH.shape[-1] * max(x_NH.element_size(), 2)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, weight_TK, topk_idx_TK, buffers, num_experts, layout_box):
        with buffers.issuing(_hidden_bytes(x_TH)) as buffer:
            per_rank, per_node, per_expert, in_rank_TD, _ = buffer.get_dispatch_layout(topk_idx_TK, num_experts)
            recv_x_MH, recv_idx_MK, recv_weight_MK, _, handle, _ = buffer.dispatch(
                x_TH, topk_idx=topk_idx_TK, topk_weights=weight_TK, num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank_TD, num_tokens_per_expert=per_expert)
        ctx.buffers, ctx.handle = buffers, handle
        layout_box.append((recv_idx_MK, in_rank_TD, handle))
        return recv_x_MH, recv_weight_MK

    @staticmethod
    def backward(ctx, grad_x_MH, grad_weight_MK):
        grad_weight_MK = None if grad_weight_MK is None else grad_weight_MK.float().contiguous()
        with ctx.buffers.issuing(_hidden_bytes(grad_x_MH)) as buffer:
            grad_x_TH, grad_weight_TK, _ = buffer.combine(grad_x_MH.contiguous(), ctx.handle,
                                                          topk_weights=grad_weight_MK)
        return grad_x_TH, grad_weight_TK, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MH, buffers, handle):
        ctx.buffers, ctx.handle = buffers, handle
        with buffers.issuing(_hidden_bytes(y_MH)) as buffer:
            y_TH, _, _ = buffer.combine(y_MH.contiguous(), handle)
        return y_TH

    @staticmethod
    def backward(ctx, grad_TH):
        with ctx.buffers.issuing(_hidden_bytes(grad_TH)) as buffer:
            grad_MH = buffer.dispatch(grad_TH.contiguous(), handle=ctx.handle)[0]
        return grad_MH, None, None


class DeepEPDispatcher(ExpertParallelDispatcher):
    """Flat over the EP group as DeepEP sees it; node-aware inside DeepEP's kernels.

    `ranks_per_node` is the EP group's ranks on one node (for the traffic counters).
    """

    wire_dtype: Optional[torch.dtype] = torch.bfloat16  # rows travel in it; None: as they are (stand-ins only)

    def __init__(self, num_experts: int, ep_rank: int, ep_size: int, buffers: DeepEPBuffers, ranks_per_node: int,
                 **kwargs) -> None:
        super().__init__(num_experts, ep_rank, ep_size, **kwargs)
        self.num_experts, self.buffers = num_experts, buffers
        self.per_node = ranks_per_node
        self.my_node, my_local = divmod(ep_rank, ranks_per_node)
        # where a row bound for each rank first lands: me on my node, my local index on every other
        self.landing_D = torch.arange(ep_size) % ranks_per_node == my_local

    def _wire(self, x_NH: torch.Tensor) -> torch.Tensor:
        return (x_NH if self.wire_dtype is None else x_NH.to(self.wire_dtype)).contiguous()

    def _send(self, x_TH, topk_idx_TK, topk_weight_TK):
        box: list = []
        recv_x_MH, weight_MK = _Dispatch.apply(self._wire(x_TH), topk_weight_TK.float().contiguous(),
                                               topk_idx_TK.long().contiguous(),
                                               self.buffers, self.num_experts, box)
        recv_idx_MK, in_rank_TD, handle = box[0]
        expert_MK = torch.where(recv_idx_MK >= 0, recv_idx_MK + self.first_local, -1)
        K = topk_idx_TK.shape[1]
        meta_bytes = K * (weight_MK.element_size() + torch.int64.itemsize)  # gates and expert ids
        rows = self._link_rows(in_rank_TD)  # the same rows come back in combine
        self.traffic.add(list(rows.values()), recv_x_MH.shape[-1] * recv_x_MH.element_size() + meta_bytes, list(rows))
        return recv_x_MH.to(x_TH.dtype), expert_MK, weight_MK, [handle, rows]

    def _received_pairs(self, hops) -> None:
        return None  # DeepEP returned its counts on the host already: counting the slots costs no sync

    def _bring_back(self, y_MH, hops):
        handle, rows = hops
        wire_MH = self._wire(y_MH)
        self.traffic.add(list(rows.values()), wire_MH.shape[-1] * wire_MH.element_size(), list(rows))
        return _Combine.apply(wire_MH, self.buffers, handle).to(y_MH.dtype)

    def _link_rows(self, in_rank_TD: torch.Tensor) -> dict[str, int]:
        """Rows one direction moves: one per other destination node over IB, one per further rank over NVLink."""
        in_rank_TD = in_rank_TD.cpu()  # dispatch has synchronised already (DeepEP returns its counts as a list)
        node_hit_TN = in_rank_TD.view(in_rank_TD.shape[0], -1, self.per_node).any(dim=-1)
        return {"ib": int(node_hit_TN.sum()) - int(node_hit_TN[:, self.my_node].sum()),
                "nvlink": int((in_rank_TD & ~self.landing_D).sum())}
