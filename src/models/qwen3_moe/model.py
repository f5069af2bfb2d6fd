"""The Qwen3-MoE language model from the shared parts: GQA with per-head q/k RMSNorm, then a dense
SwiGLU FFN (`mlp_only_layers`, or off the `decoder_sparse_step`) or an MoE layer without shared
experts behind a softmax router (Qwen3 technical report, arXiv 2505.09388, section 2). Parameter
names are transformers' Qwen3MoeForCausalLM's without the `model.` prefix.
"""
from __future__ import annotations

from moetron.models.common.attention import GroupedQueryAttention
from moetron.models.common.block import DecoderLayer
from moetron.models.common.decoder_lm import DecoderLM
from moetron.models.common.experts import GroupedExperts
from moetron.models.common.mlp import MLP
from moetron.models.common.moe import MoE
from moetron.models.common.norm import RMSNorm
from moetron.models.common.router import TopKRouter
from moetron.models.qwen3_moe.config import Qwen3MoeConfig


def decoder_layer(cfg: Qwen3MoeConfig, layer_idx: int) -> DecoderLayer:
    H = cfg.hidden_size
    if cfg.is_moe_layer(layer_idx):
        mlp = MoE(TopKRouter(cfg.router_settings(), layer_idx),
                  GroupedExperts(cfg.num_experts, H, cfg.moe_intermediate_size))
    else:
        mlp = MLP(H, cfg.intermediate_size)
    return DecoderLayer(layer_idx, RMSNorm(H, cfg.rms_norm_eps), GroupedQueryAttention(cfg.attention_settings()),
                        RMSNorm(H, cfg.rms_norm_eps), mlp)


class Qwen3Moe(DecoderLM):
    def __init__(self, cfg: Qwen3MoeConfig) -> None:
        cfg.validate()
        super().__init__(cfg, (decoder_layer(cfg, i) for i in range(cfg.num_hidden_layers)), cfg.head_dim)
        self.init_weights()
