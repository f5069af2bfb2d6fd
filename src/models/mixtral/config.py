"""Hyperparameters of a Mixtral model (Mixtral of Experts, arXiv 2401.04088): every layer an MoE of
`num_local_experts` SwiGLU experts of width `intermediate_size`, two per token, no shared expert.

Field names and defaults are transformers' `MixtralConfig`'s where it has them (the defaults here are
Mixtral-8x7B's); the balance settings are moetron's, as in every family (`router_aux_loss_coef` is
the load-balancing loss's alpha). Presets: conf/model/mixtral_*.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from moetron.models.common.attention import AttentionSettings
from moetron.models.common.checks import attention_problems, count_problems, raise_problems, routing_problems
from moetron.models.common.rope import yarn_problems
from moetron.models.common.router import RouterSettings, per_layer_aux_alpha

POSITIVE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "max_position_embeddings", "num_local_experts",
                   "num_experts_per_tok", "sliding_window")


@dataclass
class MixtralConfig:
    arch: str = "mixtral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336  # FFN width of one expert
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None  # None: hidden_size / num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rope_scaling: Optional[Any] = None  # YaRN, as DeepSeekV3Config's
    sliding_window: Optional[int] = None  # every layer attends within it (None: full causal attention)
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.02  # transformers' weight of its balance loss (per layer: per_layer_aux_alpha)
    balance_mode: str = "aux_loss"  # moetron.models.common.router.BALANCE_MODES
    seq_aux_alpha: float = 0.0
    bias_update_speed: float = 0.0  # u of loss-free balancing (balance_mode loss_free)
    router_z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE), added to the balance loss
    init_from: Optional[str] = None  # a Hugging Face folder to start from

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def router_settings(self) -> RouterSettings:
        """Softmax of the top-K logits: softmax over all experts, top-K, renormalised over the K."""
        return RouterSettings(
            hidden_size=self.hidden_size, num_experts=self.num_local_experts, top_k=self.num_experts_per_tok,
            scores="softmax", norm_topk_prob=True, balance_mode=self.balance_mode, seq_aux_alpha=self.seq_aux_alpha,
            aux_loss_alpha=per_layer_aux_alpha(self.router_aux_loss_coef, self.num_experts_per_tok,
                                               self.num_hidden_layers), bias_update_speed=self.bias_update_speed,
            z_loss_alpha=self.router_z_loss_coef)

    def attention_settings(self) -> AttentionSettings:
        return AttentionSettings(
            hidden_size=self.hidden_size, num_heads=self.num_attention_heads, num_kv_heads=self.num_key_value_heads,
            head_dim=self.attention_head_dim, rms_norm_eps=self.rms_norm_eps, sliding_window=self.sliding_window)

    def validate(self) -> "MixtralConfig":
        raise_problems(count_problems(self, POSITIVE_FIELDS) + yarn_problems(self.rope_scaling))
        problems = attention_problems(self.num_attention_heads, self.num_key_value_heads, self.attention_head_dim)
        problems += routing_problems(self.num_local_experts, self.num_experts_per_tok, self.balance_mode,
                                     "num_local_experts", "num_experts_per_tok")
        raise_problems(problems)
        return self
