"""GPT-OSS against transformers' `GptOssForCausalLM`. Two layouts differ: the router is `mlp.router`
there (`mlp.gate` here), and transformers' experts are stored input-major with gate and up columns
interleaved (`gate_up_proj` [E, H, 2I]: gate in even columns, up in odd; `down_proj` [E, I, H]) where
moetron's are output-major with the gate rows first ([E, 2I, H], [E, H, I]). The conversion is a
permutation and a transpose, exact both ways.

Shape legend: E experts, H hidden, I expert FFN width.
"""
from __future__ import annotations

import torch

from moetron.models.common.hf_adapter import SameNamesHF
from moetron.models.gpt_oss.config import GptOssConfig


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] with gate/up alternating -> [..., 2I] with the gate half first."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def _interleave(x: torch.Tensor) -> torch.Tensor:
    """The inverse of _deinterleave."""
    gate, up = x.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


class GptOssHF(SameNamesHF):
    model_type = "gpt_oss"
    causal_lm = "GptOssForCausalLM"
    config_cls, hf_config_cls = GptOssConfig, "GptOssConfig"
    shared_fields = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "attention_bias", "sliding_window", "layer_types",
        "max_position_embeddings", "num_local_experts", "num_experts_per_tok", "swiglu_alpha", "swiglu_limit",
        "rms_norm_eps", "initializer_range", "tie_word_embeddings", "router_aux_loss_coef",
    )
    renames = ((".mlp.gate.", ".mlp.router."),)

    def config_from_hf(self, hf_config, **overrides) -> GptOssConfig:
        layer_types = list(hf_config.layer_types) if getattr(hf_config, "layer_types", None) else None
        return super().config_from_hf(hf_config, **{"layer_types": layer_types, **overrides})

    def hf_config(self, cfg: GptOssConfig, **overrides):
        return super().hf_config(cfg, **{"layer_types": cfg.layer_kinds(), **overrides})

    def to_hf_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, tensor in super().to_hf_state(state).items():
            if key.endswith("experts.gate_up_proj"):  # [E, 2I, H] -> [E, H, 2I] interleaved
                tensor = _interleave(tensor.transpose(1, 2))
            elif key.endswith("experts.gate_up_proj_bias"):
                tensor = _interleave(tensor)
            elif key.endswith("experts.down_proj"):  # [E, H, I] -> [E, I, H]
                tensor = tensor.transpose(1, 2)
            out[key] = tensor.contiguous()
        return out

    def per_expert_keys(self, theirs, experts):
        return None  # its files stack the experts as its models do

    def from_hf_tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key.endswith("experts.gate_up_proj"):  # any rows of the stack: the layout is within each expert
            return _deinterleave(tensor).transpose(1, 2).contiguous()
        if key.endswith("experts.gate_up_proj_bias"):
            return _deinterleave(tensor).contiguous()
        if key.endswith("experts.down_proj"):
            return tensor.transpose(1, 2).contiguous()
        return tensor
