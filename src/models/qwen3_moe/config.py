"""Hyperparameters of a Qwen3-MoE model (Qwen3 technical report, arXiv 2505.09388, section 2).

Field names and defaults are transformers' `Qwen3MoeConfig`'s (the defaults are Qwen3-30B-A3B's), so
a Hugging Face config maps field for field; the balance settings are moetron's (the same in every
family): Qwen3 trains with a load-balancing loss of weight `router_aux_loss_coef`, and any router here
may use DeepSeek-V3's loss-free bias instead (`balance_mode=loss_free`). Presets: conf/model/qwen3_*.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from moetron.models.common.attention import AttentionSettings
from moetron.models.common.checks import attention_problems, count_problems, raise_problems, routing_problems
from moetron.models.common.rope import yarn_problems
from moetron.models.common.router import RouterSettings, per_layer_aux_alpha

POSITIVE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                   "num_experts_per_tok", "decoder_sparse_step", "sliding_window")


@dataclass
class Qwen3MoeConfig:
    arch: str = "qwen3_moe"
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144  # FFN width of the dense layers (mlp_only_layers)
    moe_intermediate_size: int = 768  # FFN width of one expert
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    max_position_embeddings: int = 40960
    rope_theta: float = 1000000.0
    rope_scaling: Optional[Any] = None  # YaRN, as DeepSeekV3Config's
    attention_bias: bool = False
    use_sliding_window: bool = False  # every layer attends within `sliding_window` (transformers' Qwen3-MoE)
    sliding_window: Optional[int] = None
    max_window_layers: int = 48  # recorded for transformers; its Qwen3-MoE attention does not read it
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True  # gates renormalised over the chosen K
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0 and i is not in mlp_only_layers
    mlp_only_layers: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.001  # transformers' weight of its balance loss (per layer: per_layer_aux_alpha)
    balance_mode: str = "aux_loss"  # moetron.models.common.router.BALANCE_MODES
    seq_aux_alpha: float = 0.0
    bias_update_speed: float = 0.0  # u of loss-free balancing (balance_mode loss_free)
    router_z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE), added to the balance loss
    init_from: Optional[str] = None  # a Hugging Face folder to start from

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    def router_settings(self) -> RouterSettings:
        """Softmax over all experts, top-K, renormalised where norm_topk_prob."""
        return RouterSettings(
            hidden_size=self.hidden_size, num_experts=self.num_experts, top_k=self.num_experts_per_tok,
            scores="softmax", norm_topk_prob=self.norm_topk_prob, balance_mode=self.balance_mode,
            seq_aux_alpha=self.seq_aux_alpha, aux_loss_alpha=per_layer_aux_alpha(self.router_aux_loss_coef, self.num_experts_per_tok,
                                               sum(map(self.is_moe_layer, range(self.num_hidden_layers)))),
            bias_update_speed=self.bias_update_speed,
            z_loss_alpha=self.router_z_loss_coef)

    def attention_settings(self) -> AttentionSettings:
        """GQA with RMSNorm over each head's q and k before the rotary embedding."""
        return AttentionSettings(
            hidden_size=self.hidden_size, num_heads=self.num_attention_heads, num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim, qkv_bias=self.attention_bias, o_bias=self.attention_bias, qk_norm=True,
            rms_norm_eps=self.rms_norm_eps, sliding_window=self.sliding_window if self.use_sliding_window else None)

    def validate(self) -> "Qwen3MoeConfig":
        problems = count_problems(self, POSITIVE_FIELDS, ("num_experts",)) + yarn_problems(self.rope_scaling)
        raise_problems(problems)  # the checks below divide by these
        problems += attention_problems(self.num_attention_heads, self.num_key_value_heads, self.head_dim)
        problems += routing_problems(self.num_experts, self.num_experts_per_tok, self.balance_mode,
                                     "num_experts", "num_experts_per_tok")
        outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if outside:
            problems.append(f"model.mlp_only_layers has {outside}, outside layers 0..{self.num_hidden_layers - 1}")
        if self.use_sliding_window and self.sliding_window is None:
            problems.append("model.use_sliding_window=true needs model.sliding_window (the window in tokens)")
        raise_problems(problems)
        return self
