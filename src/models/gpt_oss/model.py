"""The GPT-OSS language model from the shared parts: GQA with biases and sinks (a sliding window in
the sliding_attention layers), then in every layer an MoE of biased experts with GPT-OSS's clamped
SwiGLU behind a biased linear router. Parameter names are transformers' GptOssForCausalLM's without
the `model.` prefix, except the router (`mlp.gate` here, `mlp.router` there) and the experts' layout
(moetron.models.gpt_oss.hf converts).

Shape legend: S rows, I expert FFN width.
"""
from __future__ import annotations

from functools import partial

import torch

from moetron.models.common.attention import GroupedQueryAttention
from moetron.models.common.block import DecoderLayer
from moetron.models.common.decoder_lm import DecoderLM
from moetron.models.common.experts import GroupedExperts
from moetron.models.common.moe import MoE
from moetron.models.common.norm import RMSNorm
from moetron.models.common.router import TopKRouter
from moetron.models.gpt_oss.config import GptOssConfig


def clamped_swiglu(gate_SI: torch.Tensor, up_SI: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit) (GPT-OSS's experts)."""
    gate_SI = gate_SI.clamp(max=limit)
    up_SI = up_SI.clamp(min=-limit, max=limit)
    return (up_SI + 1) * (gate_SI * torch.sigmoid(gate_SI * alpha))


def decoder_layer(cfg: GptOssConfig, layer_idx: int) -> DecoderLayer:
    H = cfg.hidden_size
    activation = partial(clamped_swiglu, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    moe = MoE(TopKRouter(cfg.router_settings(), layer_idx),
              GroupedExperts(cfg.num_local_experts, H, cfg.intermediate_size, bias=True, activation=activation))
    return DecoderLayer(layer_idx, RMSNorm(H, cfg.rms_norm_eps),
                        GroupedQueryAttention(cfg.attention_settings(layer_idx)), RMSNorm(H, cfg.rms_norm_eps), moe)


class GptOss(DecoderLM):
    def __init__(self, cfg: GptOssConfig) -> None:
        cfg.validate()
        super().__init__(cfg, (decoder_layer(cfg, i) for i in range(cfg.num_hidden_layers)), cfg.head_dim)
        self.init_weights()
