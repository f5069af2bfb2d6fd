"""Hyperparameters of a GPT-OSS model (OpenAI's gpt-oss-20b / gpt-oss-120b model card, 2025): GQA
with biases and learned attention sinks, alternating sliding-window and full layers, every layer an
MoE of biased experts with a clamped SwiGLU behind a biased linear router (top-K of the logits, then
a softmax over the K), YaRN positions.

Field names and defaults are transformers' `GptOssConfig`'s (the defaults are gpt-oss-120b's); the
balance settings are moetron's, as in every family. Presets: conf/model/gpt_oss_*.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from moetron.models.common.attention import AttentionSettings
from moetron.models.common.checks import attention_problems, count_problems, raise_problems, routing_problems
from moetron.models.common.rope import yarn_problems
from moetron.models.common.router import RouterSettings, per_layer_aux_alpha

POSITIVE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "max_position_embeddings", "num_local_experts",
                   "num_experts_per_tok", "sliding_window")
LAYER_TYPES = ("sliding_attention", "full_attention")


def _alternating(num_layers: int) -> list[str]:
    """transformers' default: sliding, full, sliding, ..."""
    return [LAYER_TYPES[i % 2] for i in range(num_layers)]


@dataclass
class GptOssConfig:
    arch: str = "gpt_oss"
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880  # FFN width of one expert
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    attention_bias: bool = True
    sliding_window: int = 128  # the window of the sliding_attention layers
    layer_types: Optional[list[str]] = None  # per layer: sliding_attention | full_attention; None: alternating
    max_position_embeddings: int = 131072
    rope_theta: float = 150000.0
    rope_scaling: Optional[Any] = field(default_factory=lambda: {
        "type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False})
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    swiglu_alpha: float = 1.702  # the gate's sigmoid sharpness: gate * sigmoid(alpha * gate)
    swiglu_limit: float = 7.0  # gate clamped above, up clamped to [-limit, limit]
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.9  # transformers' weight of its balance loss (per layer: per_layer_aux_alpha)
    balance_mode: str = "aux_loss"  # moetron.models.common.router.BALANCE_MODES
    seq_aux_alpha: float = 0.0
    bias_update_speed: float = 0.0  # u of loss-free balancing (balance_mode loss_free)
    router_z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE), added to the balance loss
    init_from: Optional[str] = None  # a Hugging Face folder to start from

    def layer_kinds(self) -> list[str]:
        return list(self.layer_types) if self.layer_types is not None else _alternating(self.num_hidden_layers)

    def router_settings(self) -> RouterSettings:
        """A biased linear router: top-K of the logits, gates the softmax over those K."""
        return RouterSettings(
            hidden_size=self.hidden_size, num_experts=self.num_local_experts, top_k=self.num_experts_per_tok,
            scores="softmax_topk", linear_bias=True, balance_mode=self.balance_mode, seq_aux_alpha=self.seq_aux_alpha,
            aux_loss_alpha=per_layer_aux_alpha(self.router_aux_loss_coef, self.num_experts_per_tok,
                                               self.num_hidden_layers), bias_update_speed=self.bias_update_speed,
            z_loss_alpha=self.router_z_loss_coef)

    def attention_settings(self, layer_idx: int) -> AttentionSettings:
        sliding = self.layer_kinds()[layer_idx] == "sliding_attention"
        return AttentionSettings(
            hidden_size=self.hidden_size, num_heads=self.num_attention_heads, num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim, qkv_bias=self.attention_bias, o_bias=self.attention_bias,
            rms_norm_eps=self.rms_norm_eps, sliding_window=self.sliding_window if sliding else None, sinks=True)

    def validate(self) -> "GptOssConfig":
        raise_problems(count_problems(self, POSITIVE_FIELDS) + yarn_problems(self.rope_scaling))
        problems = attention_problems(self.num_attention_heads, self.num_key_value_heads, self.head_dim)
        problems += routing_problems(self.num_local_experts, self.num_experts_per_tok, self.balance_mode,
                                     "num_local_experts", "num_experts_per_tok")
        if self.balance_mode == "loss_free":
            problems.append("model.balance_mode=loss_free: GPT-OSS's router chooses on its logits (no scores for "
                            "the bias to steer); use aux_loss, seq_aux or none")
        kinds = self.layer_kinds()
        if len(kinds) != self.num_hidden_layers or set(kinds) - set(LAYER_TYPES):
            problems.append(f"model.layer_types needs one of {LAYER_TYPES} per layer "
                            f"({self.num_hidden_layers}), or null for alternating ones")
        raise_problems(problems)
        return self
