"""Qwen3-MoE against transformers' `Qwen3MoeForCausalLM`: the same names and expert layout (stacked
`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]); moetron's routing bias (`expert_bias`, used only
under balance_mode=loss_free) has no place there and is left out, with a warning when it is not zero."""
from __future__ import annotations

from moetron.models.common.hf_adapter import (HFAdapter, import_transformers, refuse_other_activation,
                                              rope_from_hf, rope_to_hf)
from moetron.models.qwen3_moe.config import Qwen3MoeConfig


class Qwen3MoeHF(HFAdapter):
    model_type = "qwen3_moe"
    causal_lm = "Qwen3MoeForCausalLM"
    shared_fields = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "attention_bias",
        "use_sliding_window", "sliding_window", "max_window_layers", "num_experts", "num_experts_per_tok",
        "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "rms_norm_eps", "initializer_range",
        "tie_word_embeddings", "router_aux_loss_coef",
    )

    def config_from_hf(self, hf_config, **overrides) -> Qwen3MoeConfig:
        refuse_other_activation(hf_config)
        fields = {name: getattr(hf_config, name) for name in self.shared_fields}
        fields["mlp_only_layers"] = list(fields["mlp_only_layers"] or [])
        fields["rope_theta"], fields["rope_scaling"] = rope_from_hf(hf_config)
        fields.update(overrides)
        return Qwen3MoeConfig(**fields).validate()

    def hf_config(self, cfg: Qwen3MoeConfig, **overrides):
        fields = {name: getattr(cfg, name) for name in self.shared_fields}
        fields["rope_parameters"] = rope_to_hf(cfg.rope_theta, cfg.rope_scaling)
        fields.update(overrides)
        return import_transformers().Qwen3MoeConfig(**fields)

    def ours_only(self, key: str) -> bool:
        return key.endswith(".gate.expert_bias")

    def export_notes(self, model) -> list[str]:
        biased = [name for name, buf in model.named_buffers() if name.endswith("expert_bias") and bool(buf.any())]
        return [f"to_hf leaves out the loss-free routing biases of {len(biased)} layer(s): transformers' "
                "Qwen3-MoE routes without them, so its choices of experts differ"] if biased else []
