"""Qwen3-MoE against transformers' `Qwen3MoeForCausalLM`: the same names and expert layout (stacked
`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I])."""
from __future__ import annotations

from moetron.models.common.hf_adapter import SameNamesHF
from moetron.models.qwen3_moe.config import Qwen3MoeConfig


class Qwen3MoeHF(SameNamesHF):
    model_type = "qwen3_moe"
    causal_lm = "Qwen3MoeForCausalLM"
    config_cls, hf_config_cls = Qwen3MoeConfig, "Qwen3MoeConfig"
    shared_fields = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "attention_bias",
        "use_sliding_window", "sliding_window", "max_window_layers", "num_experts", "num_experts_per_tok",
        "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "rms_norm_eps", "initializer_range",
        "tie_word_embeddings", "router_aux_loss_coef",
    )
    weightless = SameNamesHF.weightless | {"max_window_layers"}  # transformers' Qwen3-MoE does not read it
