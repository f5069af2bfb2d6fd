"""Hyperparameters of a DeepSeek-V2 model (arXiv 2405.04434): MLA (with or without a query low-rank:
V2-Lite has none), DeepSeekMoE with shared experts behind a softmax router, greedy or group-limited
greedy top-K (a group scores its best expert), gates scaled by `routed_scaling_factor`.

Field names are transformers' `DeepseekV2Config`'s and DeepSeek's published config.json's (the
defaults are DeepSeek-V2's); the balance settings are moetron's, as in every family: DeepSeek-V2
trains with the expert-level sequence-wise balance loss of weight `aux_loss_alpha` (section 2.2.3).
Presets: conf/model/deepseek_v2*.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from moetron.models.common.checks import (count_problems, group_limit_problems, mla_decoder_problems,
                                          raise_problems, routing_problems)
from moetron.models.common.rope import yarn_problems
from moetron.models.common.router import RouterSettings

POSITIVE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                   "v_head_dim", "max_position_embeddings", "num_experts_per_tok", "n_group", "topk_group",
                   "moe_layer_freq")
COUNT_FIELDS = ("first_k_dense_replace", "n_routed_experts", "n_shared_experts")
TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclass
class DeepSeekV2Config:
    arch: str = "deepseek_v2"
    vocab_size: int = 102400
    hidden_size: int = 5120
    intermediate_size: int = 12288  # FFN width of the dense layers
    moe_intermediate_size: int = 1536  # FFN width of one expert
    num_hidden_layers: int = 60
    first_k_dense_replace: int = 1  # layers [0, k) are dense, the rest MoE
    moe_layer_freq: int = 1  # recorded; transformers' DeepSeek-V2 makes every layer from k on MoE
    num_attention_heads: int = 128
    # Multi-head Latent Attention (section 2.1); q_lora_rank None: an uncompressed query (V2-Lite)
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: Optional[Any] = None  # YaRN as transformers names it (the presets carry DeepSeek's)
    # DeepSeekMoE (section 2.2)
    n_routed_experts: int = 160
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    topk_method: str = "group_limited_greedy"  # or greedy: top-K over all experts
    n_group: int = 8  # device groups of group-limited routing
    topk_group: int = 3  # groups a token may route to (M)
    routed_scaling_factor: float = 16.0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001  # alpha of the balance loss (the sequence-wise one under seq_aux)
    seq_aux: bool = True  # recorded as published; balance_mode says which loss runs
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    balance_mode: str = "seq_aux"  # moetron.models.common.router.BALANCE_MODES
    bias_update_speed: float = 0.0  # u of loss-free balancing (balance_mode loss_free)
    router_z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE), added to the balance loss
    init_from: Optional[str] = None  # a Hugging Face folder to start from

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_interleave(self) -> bool:
        """DeepSeek's rotary layout: adjacent pairs rotate together (MLA reads it)."""
        return True

    @property
    def group_limited(self) -> bool:
        return self.topk_method == "group_limited_greedy"

    def router_settings(self) -> RouterSettings:
        """Softmax over all experts, top-K (among the best `topk_group` groups, each scored by its best
        expert, under group_limited_greedy), gates times routed_scaling_factor."""
        return RouterSettings(
            hidden_size=self.hidden_size, num_experts=self.n_routed_experts, top_k=self.num_experts_per_tok,
            # DeepSeek's code renormalises the K gates or scales them, never both (transformers' V2
            # ignores norm_topk_prob; the published configs set it false)
            scores="softmax", norm_topk_prob=self.norm_topk_prob,
            scaling_factor=1.0 if self.norm_topk_prob else self.routed_scaling_factor,
            n_group=self.n_group if self.group_limited else 1, topk_group=self.topk_group if self.group_limited else 1,
            group_score="max", balance_mode=self.balance_mode, seq_aux_alpha=self.aux_loss_alpha,
            aux_loss_alpha=self.aux_loss_alpha, bias_update_speed=self.bias_update_speed,
            z_loss_alpha=self.router_z_loss_coef)

    def validate(self) -> "DeepSeekV2Config":
        problems = count_problems(self, POSITIVE_FIELDS, COUNT_FIELDS)
        raise_problems(problems + yarn_problems(self.rope_scaling))  # the checks below divide by these
        problems = routing_problems(self.n_routed_experts, self.num_experts_per_tok, self.balance_mode,
                                    "n_routed_experts", "num_experts_per_tok")
        if self.topk_method not in TOPK_METHODS:
            problems.append(f"model.topk_method={self.topk_method!r}: choose one of {TOPK_METHODS}")
        if self.scoring_func != "softmax":
            problems.append(f"model.scoring_func={self.scoring_func!r}: DeepSeek-V2 scores experts by softmax")
        if self.moe_layer_freq != 1:
            problems.append(f"model.moe_layer_freq={self.moe_layer_freq}: every layer from "
                            "model.first_k_dense_replace on is MoE here (as in transformers); set 1")
        if self.group_limited:
            problems += group_limit_problems(self.n_routed_experts, self.n_group, self.topk_group,
                                             self.num_experts_per_tok, top2=False)
        problems += mla_decoder_problems(self)
        raise_problems(problems)
        return self
