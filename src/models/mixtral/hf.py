"""Mixtral against transformers' `MixtralForCausalLM`: the same names and stacked expert layout in
memory (its files keep Mixtral's original names).
Router jitter (transformers' `router_jitter_noise`, a training-time multiplicative noise) is refused
on import rather than silently dropped."""
from __future__ import annotations

from moetron.models.common.hf_adapter import SameNamesHF
from moetron.models.mixtral.config import MixtralConfig


class MixtralHF(SameNamesHF):
    model_type = "mixtral"
    causal_lm = "MixtralForCausalLM"
    config_cls, hf_config_cls = MixtralConfig, "MixtralConfig"
    shared_fields = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "num_local_experts",
        "num_experts_per_tok", "rms_norm_eps", "initializer_range", "tie_word_embeddings", "router_aux_loss_coef",
    )
    # transformers' Mixtral files keep the original names: `block_sparse_moe`, each expert's w1 (gate),
    # w3 (up) and w2 (down)
    disk_renames = ((".mlp.", ".block_sparse_moe."),)
    expert_entries = ("w1", "w3", "w2")

    def config_from_hf(self, hf_config, **overrides) -> MixtralConfig:
        if getattr(hf_config, "router_jitter_noise", 0.0):
            raise ValueError(f"router_jitter_noise={hf_config.router_jitter_noise}: moetron's routers add no "
                             "noise; set it to 0 to train this model here")
        return super().config_from_hf(hf_config, **overrides)
