"""DeepSeekMoE layer (report section 2.1.2, eq. 12): shared experts plus top-K routed experts.

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
from moetron.models.deepseek_v3.config import DeepSeekV3Config
from moetron.models.deepseek_v3.experts import GroupedExperts
from moetron.models.deepseek_v3.layers import MLP
from moetron.models.deepseek_v3.router import TopKRouter
from moetron.profiling import label


class MoE(nn.Module):
    """Names follow transformers' DeepseekV3MoE: `gate`, `experts`, `shared_experts`."""

    def __init__(self, cfg: DeepSeekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.gate = TopKRouter(cfg, layer_idx)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts > 0 else None
        )
        self.dispatcher = LocalDispatcher(cfg.n_routed_experts)

    def forward(self, x_BSH: torch.Tensor, valid_len: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns the layer output and the (alpha-weighted) balance loss, or None; `valid_len`: the
        positions that count in the router's loads and balance loss (TopKRouter.forward)."""
        B, S, H = x_BSH.shape
        routing = self.gate(x_BSH, valid_len)
        x_TH = x_BSH.reshape(B * S, H)
        with label("moe.dispatch"):  # regions in profiler traces (moetron.profiling)
            x_recv_RH, tokens_per_expert, handle = self.dispatcher.dispatch(x_TH, routing.topk_idx_TK,
                                                                            routing.topk_weight_TK)
        with label("moe.experts"):
            y_recv_RH = self.experts(x_recv_RH, tokens_per_expert)
        with label("moe.combine"):
            y_TH = self.dispatcher.combine(y_recv_RH, handle)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        return y_TH.view(B, S, H), routing.balance_loss
