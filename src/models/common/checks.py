"""Checks every family's config runs in `validate()`: each problem names the key and the fix."""
from __future__ import annotations

from moetron.models.common.router import BALANCE_MODES


def count_problems(cfg, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> list[str]:
    """Fields that must be >= 1 (None allowed: an optional width) and fields that must be >= 0."""
    problems = [f"model.{key}={getattr(cfg, key)} must be at least 1" for key in positive
                if getattr(cfg, key) is not None and getattr(cfg, key) < 1]
    return problems + [f"model.{key}={getattr(cfg, key)} must be at least 0" for key in non_negative
                       if getattr(cfg, key) < 0]


def routing_problems(num_experts: int, top_k: int, balance_mode: str, experts_key: str, top_k_key: str) -> list[str]:
    problems = []
    if balance_mode not in BALANCE_MODES:
        problems.append(f"model.balance_mode={balance_mode!r}: choose one of {BALANCE_MODES}")
    if num_experts and top_k > num_experts:
        problems.append(f"model.{top_k_key}={top_k} exceeds model.{experts_key}={num_experts}: lower it")
    return problems


def attention_problems(num_heads: int, num_kv_heads: int, head_dim: int) -> list[str]:
    problems = []
    if num_heads % num_kv_heads:
        problems.append(f"model.num_key_value_heads={num_kv_heads} must divide model.num_attention_heads={num_heads}")
    if head_dim % 2:
        problems.append(f"model.head_dim={head_dim} must be even (rotary pairs)")
    return problems


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ValueError("invalid model config:\n  " + "\n  ".join(problems))


def group_limit_problems(num_experts: int, n_group: int, topk_group: int, top_k: int, top2: bool) -> list[str]:
    """Group-limited routing (DeepSeek-V2's device limit, V3's node limit): groups divide the experts,
    a token's `topk_group` groups hold its K experts; `top2`: a group scores its two best experts."""
    problems = []
    if num_experts % n_group:
        problems.append(f"model.n_group={n_group} must divide model.n_routed_experts={num_experts}")
    if not 1 <= topk_group <= n_group:
        problems.append(f"model.topk_group={topk_group} must be in [1, model.n_group={n_group}]")
    reachable = topk_group * (num_experts // n_group)
    if top_k > reachable:
        problems.append(f"model.num_experts_per_tok={top_k} exceeds the {reachable} experts in "
                        f"model.topk_group={topk_group} groups; raise topk_group or lower num_experts_per_tok")
    if top2 and n_group > 1 and num_experts // n_group < 2:
        problems.append("group-limited routing scores a group by its two best experts: use >= 2 experts per group")
    return problems


def mla_decoder_problems(cfg) -> list[str]:
    """A DeepSeek-style decoder: MLA's rotary part in pairs, the dense layers a prefix of the stack."""
    problems = []
    if cfg.qk_rope_head_dim % 2:
        problems.append(f"model.qk_rope_head_dim={cfg.qk_rope_head_dim} must be even (rotary pairs)")
    if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
        problems.append(f"model.first_k_dense_replace={cfg.first_k_dense_replace} must be in [0, num_hidden_layers]")
    return problems
