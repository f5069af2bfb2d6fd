"""The Mixtral language model from the shared parts: GQA (a sliding window where the config has one),
then in every layer an MoE of SwiGLU experts behind a softmax router (arXiv 2401.04088, section 2).
Parameter names are transformers' MixtralForCausalLM's without the `model.` prefix."""
from __future__ import annotations

from moetron.models.common.attention import GroupedQueryAttention
from moetron.models.common.block import DecoderLayer
from moetron.models.common.decoder_lm import DecoderLM
from moetron.models.common.experts import GroupedExperts
from moetron.models.common.moe import MoE
from moetron.models.common.norm import RMSNorm
from moetron.models.common.router import TopKRouter
from moetron.models.mixtral.config import MixtralConfig


def decoder_layer(cfg: MixtralConfig, layer_idx: int) -> DecoderLayer:
    H = cfg.hidden_size
    moe = MoE(TopKRouter(cfg.router_settings(), layer_idx),
              GroupedExperts(cfg.num_local_experts, H, cfg.intermediate_size))
    return DecoderLayer(layer_idx, RMSNorm(H, cfg.rms_norm_eps), GroupedQueryAttention(cfg.attention_settings()),
                        RMSNorm(H, cfg.rms_norm_eps), moe)


class Mixtral(DecoderLM):
    def __init__(self, cfg: MixtralConfig) -> None:
        cfg.validate()
        super().__init__(cfg, (decoder_layer(cfg, i) for i in range(cfg.num_hidden_layers)), cfg.attention_head_dim)
        self.init_weights()
