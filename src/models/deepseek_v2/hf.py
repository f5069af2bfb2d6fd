"""DeepSeek-V2 against transformers' `DeepseekV2ForCausalLM`: DeepSeek-V3's names without a routing
bias. transformers' V2 attention takes biases (`attention_bias`) and its MLPs (`mlp_bias`) that
DeepSeek's checkpoints do not use: a config with them is refused."""
from __future__ import annotations

from moetron.models.common.hf_adapter import SameNamesHF
from moetron.models.deepseek_v2.config import DeepSeekV2Config


class DeepSeekV2HF(SameNamesHF):
    model_type = "deepseek_v2"
    causal_lm = "DeepseekV2ForCausalLM"
    config_cls, hf_config_cls = DeepSeekV2Config, "DeepseekV2Config"
    shared_fields = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "first_k_dense_replace", "moe_layer_freq", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "n_routed_experts",
        "n_shared_experts", "num_experts_per_tok", "topk_method", "n_group", "topk_group", "routed_scaling_factor",
        "norm_topk_prob", "scoring_func", "aux_loss_alpha", "seq_aux", "rms_norm_eps", "initializer_range",
        "tie_word_embeddings",
    )
    defaults = {"moe_layer_freq": 1, "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
                "n_group": 1, "topk_group": 1}  # what transformers' own configs may lack

    def config_from_hf(self, hf_config, **overrides) -> DeepSeekV2Config:
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(hf_config, flag, False):
                raise ValueError(f"{flag}=True: DeepSeek-V2's projections have no biases here")
        if hf_config.num_key_value_heads != hf_config.num_attention_heads:
            raise ValueError("MLA has one key/value per head: num_key_value_heads must equal num_attention_heads")
        filled = {k: v for k, v in self.defaults.items() if getattr(hf_config, k, None) is None}
        return super().config_from_hf(hf_config, **{**filled, **overrides})

    def hf_config(self, cfg: DeepSeekV2Config, **overrides):
        return super().hf_config(cfg, num_key_value_heads=cfg.num_attention_heads, **overrides)
