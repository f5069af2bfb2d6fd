"""The DeepSeek-V2 language model: DeepSeek-V3's blocks (MLA, then a dense SwiGLU FFN or DeepSeekMoE
with shared experts) behind V2's softmax router, without Multi-Token Prediction. Parameter names are
transformers' DeepseekV2ForCausalLM's without the `model.` prefix."""
from __future__ import annotations

from moetron.models.common.decoder_lm import DecoderLM
from moetron.models.deepseek_v2.config import DeepSeekV2Config
from moetron.models.deepseek_v3.block import decoder_layer


class DeepSeekV2(DecoderLM):
    def __init__(self, cfg: DeepSeekV2Config) -> None:
        cfg.validate()
        layers = (decoder_layer(cfg, i, moe=i >= cfg.first_k_dense_replace and cfg.n_routed_experts > 0)
                  for i in range(cfg.num_hidden_layers))
        super().__init__(cfg, layers, cfg.qk_rope_head_dim)
        self.init_weights()
