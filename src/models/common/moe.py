"""An MoE layer: optional shared experts plus top-K routed experts (DeepSeekMoE, DeepSeek-V3 report
section 2.1.2, eq. 12; without shared experts, Mixtral's, Qwen3-MoE's and GPT-OSS's layer).

h'_t = u_t + sum_i FFN^shared_i(u_t) + sum_i g_{i,t} FFN^routed_i(u_t). The routed part runs
router -> dispatcher.dispatch -> grouped expert GEMMs -> dispatcher.combine. The dispatcher is
pluggable (`moetron.comm.dispatch`): local here; expert parallelism swaps in an all-to-all one.

Shape legend: B batch, S sequence, T tokens (B*S), H hidden, R rows received by local experts.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moetron.comm.dispatch import LocalDispatcher
from moetron.models.common.experts import GroupedExperts
from moetron.profiling import label


class MoE(nn.Module):
    """`gate` (a router: moetron.models.common.router), `experts` (GroupedExperts), `shared_experts`
    (a dense FFN, or None), as transformers' DeepseekV3MoE names them; `dispatcher` moves token rows
    to the experts (expert parallelism swaps it). Every MoE layer of every family is this class:
    expert parallelism and the balance hook find them by it."""

    def __init__(self, gate: nn.Module, experts: GroupedExperts, shared_experts: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_experts = shared_experts
        self.dispatcher = LocalDispatcher(experts.global_experts)
        # a slot the memory converter sets (memory.gate_before_down_proj): the experts apply the
        # routing weights before their down-projection, so the combine only sums
        self.gate_before_down_proj = False

    def forward(self, x_BSH: torch.Tensor, valid_len: Optional[int] = None, counted_BS: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns the layer output and the (alpha-weighted) balance loss, or None; `valid_len` and
        `counted_BS`: the positions that count in the router's loads and balance loss (TopKRouter.forward)."""
        B, S, H = x_BSH.shape
        routing = self.gate(x_BSH, valid_len, counted_BS)
        x_TH = x_BSH.reshape(B * S, H)
        with label("moe.dispatch"):  # regions in profiler traces (moetron.profiling)
            x_recv_RH, tokens_per_expert, handle = self.dispatcher.dispatch(x_TH, routing.topk_idx_TK,
                                                                            routing.topk_weight_TK)
        gated = self.gate_before_down_proj
        with label("moe.experts"):
            y_recv_RH = self.experts(x_recv_RH, tokens_per_expert, handle.weight_S if gated else None)
        with label("moe.combine"):
            y_TH = self.dispatcher.combine(y_recv_RH, handle, weighted=not gated)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        return y_TH.view(B, S, H), routing.balance_loss
