"""DeepSeek-V3's transformer block from the shared parts: pre-norm MLA, then pre-norm dense SwiGLU
FFN (the first `first_k_dense_replace` layers) or DeepSeekMoE (report section 2.1).
"""
from __future__ import annotations

from moetron.models.common.block import DecoderLayer
from moetron.models.common.experts import GroupedExperts
from moetron.models.common.mla import MLA
from moetron.models.common.mlp import MLP
from moetron.models.common.moe import MoE
from moetron.models.common.norm import RMSNorm
from moetron.models.common.router import TopKRouter
from moetron.models.deepseek_v3.config import DeepSeekV3Config


def deepseek_moe(cfg: DeepSeekV3Config, layer_idx: int) -> MoE:
    """Shared experts (one SwiGLU of their summed width) plus routed experts behind the sigmoid router."""
    shared = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
              if cfg.n_shared_experts > 0 else None)
    return MoE(TopKRouter(cfg.router_settings(), layer_idx),
               GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size), shared)


def decoder_layer(cfg: DeepSeekV3Config, layer_idx: int, moe: bool) -> DecoderLayer:
    mlp = deepseek_moe(cfg, layer_idx) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
    return DecoderLayer(layer_idx, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps), MLA(cfg),
                        RMSNorm(cfg.hidden_size, cfg.rms_norm_eps), mlp)
