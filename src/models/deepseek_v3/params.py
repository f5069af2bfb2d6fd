"""Parameter counts and training FLOPs of a DeepSeek-V3 model, from its config alone.

Counted (report section 4.2: 671B total, 37B activated): every parameter of the main model,
embedding and output head included, MTP modules excluded (the published checkpoint's 685B adds the
14B MTP module: 11.6B of its own plus copies of the embedding and head). Activated per token
(`activated_per_token`, what the planner and this module's printout report: 36.63B for v3_671b, the
report's 37B to whole billions): every parameter of the main model a token's forward multiplies by,
i.e. the output head counted and the input embedding table not (a token reads one row of it), and
routed expert weights at K/E of their total. Router biases are buffers, not parameters.

The counts come from the config, not from a module, so they do not depend on the parallel layout
(under expert parallelism a rank's module holds 1/ep of the routed experts; a pipeline rank holds
some layers). `tests/unit/test_model.py` holds them equal to a whole model's parameters.

    python -m moetron.models.deepseek_v3.params v3_671b
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from moetron.models.deepseek_v3.config import DeepSeekV3Config, load_preset


@dataclass
class ParameterCount:
    total: int  # main model, embedding and head included
    activated: int  # total less the routed expert weights a token does not use (embedding table included)
    mtp: int  # MTP modules (not in total)
    embedding_and_head: int
    mtp_activated: int = 0  # per token, in the MTP modules
    embedding_table: int = 0  # the input embedding table (0 when tied to the head, which a token uses)

    @property
    def activated_per_token(self) -> int:
        """Activated parameters per token, as reported: the output head counted, the input
        embedding table not (a token reads one row of it)."""
        return self.activated - self.embedding_table


@dataclass
class _Block:
    total: int
    unused_routed: int  # routed expert weights a token does not use


def _attention(cfg: DeepSeekV3Config) -> int:
    """MLA's projections and latent norms (eqs. 1-8)."""
    H, N = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = H * N * cfg.qk_head_dim
    else:
        q = H * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * N * cfg.qk_head_dim
    kv = H * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * N * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + N * cfg.v_head_dim * H


def _block(cfg: DeepSeekV3Config, moe: bool) -> _Block:
    """One decoder block: two norms, MLA, then a dense SwiGLU FFN or DeepSeekMoE (eq. 12)."""
    H = cfg.hidden_size
    fixed = 2 * H + _attention(cfg)
    if not moe:
        return _Block(fixed + 3 * H * cfg.intermediate_size, 0)
    E, K, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    routed = 3 * E * H * I
    fixed += E * H + 3 * H * I * cfg.n_shared_experts  # router, shared experts
    return _Block(fixed + routed, routed * (E - K) // E)


def count_parameters(cfg: DeepSeekV3Config) -> ParameterCount:
    H, V = cfg.hidden_size, cfg.vocab_size
    has_moe = cfg.n_routed_experts > 0
    blocks = [_block(cfg, moe=i >= cfg.first_k_dense_replace and has_moe) for i in range(cfg.num_hidden_layers)]
    embed_head = V * H + (0 if cfg.tie_word_embeddings else V * H)
    total = embed_head + H + sum(b.total for b in blocks)  # + the final norm
    activated = total - sum(b.unused_routed for b in blocks)
    depth = _block(cfg, moe=has_moe)
    mtp_depth = 3 * H + 2 * H * H + depth.total  # hnorm, enorm, norm; eh_proj; its block
    D = cfg.num_nextn_predict_layers
    return ParameterCount(total=total, activated=activated, mtp=D * mtp_depth, embedding_and_head=embed_head,
                          mtp_activated=D * (mtp_depth - depth.unused_routed),
                          embedding_table=0 if cfg.tie_word_embeddings else V * H)


def training_flops_per_token(cfg: DeepSeekV3Config, seq_len: int) -> float:
    """Model FLOPs of one training token: 3 x forward (forward + backward's two matmuls).

    Forward: 2 x the activated matmul parameters (embedding lookups excluded, output head included,
    and per MTP depth its block, projection and the head again) plus causal attention,
    2 * S * heads * (qk_head + v_head) / 2 per attention layer (the convention of
    reference/h200-measurements.md, which gives 2.18 GFLOP per token for `mini` without MTP at S=2048).
    Norm weights count as matmul parameters (a negligible excess, kept for continuity).
    """
    count = count_parameters(cfg)
    head = cfg.vocab_size * cfg.hidden_size
    D = cfg.num_nextn_predict_layers
    matmul_params = count.activated - head + count.mtp_activated + D * head  # embedding out; MTP reuses the head
    attention_layers = cfg.num_hidden_layers + D
    attention = attention_layers * 2 * seq_len * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) / 2
    return 3.0 * (2.0 * matmul_params + attention)


def main(argv: list[str]) -> None:
    name = argv[0] if argv else "v3_671b"
    count = count_parameters(load_preset(name))
    print(f"{name}: total {count.total / 1e9:.2f}B (main model, embedding and head included), "
          f"activated per token {count.activated_per_token / 1e9:.2f}B (output head counted, input embedding "
          f"table not: a token reads one row of it), MTP modules {count.mtp / 1e9:.2f}B more")


if __name__ == "__main__":
    main(sys.argv[1:])
