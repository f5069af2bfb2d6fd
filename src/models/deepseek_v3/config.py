"""Hyperparameters of a DeepSeek-V3-style model.

Field names follow transformers' `DeepseekV3Config` where one exists, so a Hugging Face config maps
field for field (see `moetron.models.hf`). Presets live in `conf/model/*.yaml` (`tiny`, `mini`,
`v3_671b`) and load through `load_preset`, which rejects unknown keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from moetron.models.common.checks import count_problems, group_limit_problems, mla_decoder_problems, raise_problems
from moetron.models.common.rope import yarn_problems
from moetron.models.common.router import BALANCE_MODES, RouterSettings
POSITIVE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                   "v_head_dim", "max_position_embeddings", "num_experts_per_tok", "n_group", "topk_group")
COUNT_FIELDS = ("first_k_dense_replace", "n_routed_experts", "n_shared_experts", "num_nextn_predict_layers")


@dataclass
class DeepSeekV3Config:
    """Every hyperparameter of the model; report section numbers refer to arXiv 2412.19437."""

    arch: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # FFN width of the dense layers
    moe_intermediate_size: int = 2048  # FFN width of one expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3  # layers [0, k) are dense, the rest MoE
    num_attention_heads: int = 128
    # Multi-head Latent Attention (section 2.1.1); q_lora_rank None means an uncompressed query.
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # DeepSeek's rotary layout: adjacent pairs rotate together
    # YaRN context extension (report section 4.3), named as transformers names it: {type: yarn,
    # factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim}; None: plain RoPE.
    # Typed Any: OmegaConf cannot set an Optional[Dict] that is None from the command line (yarn_problems checks it)
    rope_scaling: Optional[Any] = None
    max_position_embeddings: int = 4096
    # DeepSeekMoE (section 2.1.2)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8  # expert groups for group-limited routing (nodes, under expert parallelism)
    topk_group: int = 4  # groups a token may route to (M in the report)
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    # Load balancing: loss_free (bias, plus the complementary sequence-wise loss when
    # seq_aux_alpha > 0, as DeepSeek-V3), seq_aux (sequence-wise loss only), aux_loss (the classic
    # batch-wise auxiliary loss, the baseline of arXiv 2408.15664), none.
    balance_mode: str = "loss_free"
    bias_update_speed: float = 0.001  # u in b_i += u * sign(mean_load - load_i)
    seq_aux_alpha: float = 1e-4
    aux_loss_alpha: float = 1e-3
    router_z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE), added to the balance loss
    # Multi-Token Prediction (section 2.2)
    num_nextn_predict_layers: int = 1  # D
    mtp_loss_weight: float = 0.3  # lambda; the MTP loss is lambda / D * sum_k L^k
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    init_from: Optional[str] = None  # a Hugging Face folder (moetron-export writes one) to start from

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def router_settings(self) -> RouterSettings:
        """The sigmoid router with loss-free balancing and group-limited top-K (section 2.1.2)."""
        return RouterSettings(
            hidden_size=self.hidden_size, num_experts=self.n_routed_experts, top_k=self.num_experts_per_tok,
            scores="sigmoid", norm_topk_prob=self.norm_topk_prob, scaling_factor=self.routed_scaling_factor,
            n_group=self.n_group, topk_group=self.topk_group, group_score="top2_sum",
            balance_mode=self.balance_mode, seq_aux_alpha=self.seq_aux_alpha, aux_loss_alpha=self.aux_loss_alpha,
            bias_update_speed=self.bias_update_speed,
            z_loss_alpha=self.router_z_loss_coef)

    def validate(self) -> "DeepSeekV3Config":
        """Raise ValueError naming the key and the fix for an inconsistent config."""
        problems = count_problems(self, POSITIVE_FIELDS, COUNT_FIELDS) + yarn_problems(self.rope_scaling)
        raise_problems(problems)  # the checks below divide by these
        if self.balance_mode not in BALANCE_MODES:
            problems.append(f"model.balance_mode={self.balance_mode!r}: choose one of {BALANCE_MODES}")
        problems += group_limit_problems(self.n_routed_experts, self.n_group, self.topk_group,
                                         self.num_experts_per_tok, top2=True)
        problems += mla_decoder_problems(self)
        raise_problems(problems)
        return self


def load_preset(name: str, **overrides) -> DeepSeekV3Config:
    """A DeepSeek-V3 preset, `conf/model/<name>.yaml`, validated (moetron.models.load_preset loads any
    family's); unknown keys raise an error naming them."""
    from moetron.models.registry import load_preset as load_any_preset

    cfg = load_any_preset(name, **overrides)
    if not isinstance(cfg, DeepSeekV3Config):
        raise ValueError(f"model preset {name!r} is a {cfg.arch} model: moetron.models.load_preset loads it")
    return cfg
