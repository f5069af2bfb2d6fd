"""Parameter counts of a DeepSeek-V3 model, total and activated per token.

Counted (report section 4.2: 671B total, 37B activated): every parameter of the main model,
embedding and output head included, MTP modules excluded (the published checkpoint's 685B adds the
14B MTP module: 11.6B of its own plus copies of the embedding and head). Activated per token: everything except the routed experts a token does not use,
i.e. routed expert weights count K/E of their total. Router biases are buffers, not parameters.

    python -m moetron.models.deepseek_v3.params v3_671b
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

from moetron.models.deepseek_v3.config import load_preset
from moetron.models.deepseek_v3.experts import GroupedExperts


@dataclass
class ParameterCount:
    total: int  # main model, embedding and head included
    activated: int  # per token
    mtp: int  # MTP modules (not in total)
    embedding_and_head: int


def count_parameters(model: nn.Module) -> ParameterCount:
    cfg = model.cfg
    mtp = sum(p.numel() for p in model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    routed = sum(p.numel() for m in model.layers.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    unused_routed = routed * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
    embed_head = model.embed_tokens.weight.numel() + (0 if cfg.tie_word_embeddings else model.lm_head.weight.numel())
    return ParameterCount(total=total, activated=total - unused_routed, mtp=mtp, embedding_and_head=embed_head)


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Model FLOPs of one training token: 3 x forward (forward + backward's two matmuls).

    Forward: 2 x the activated matmul parameters (embedding lookups excluded, output head included,
    and per MTP depth its block, projection and the head again) plus causal attention,
    2 * S * heads * (qk_head + v_head) / 2 per attention layer (the convention of
    reference/h200-measurements.md, which gives 2.18 GFLOP per token for `mini` without MTP at S=2048).
    """
    cfg = model.cfg
    count = count_parameters(model)
    embedding = model.embed_tokens.weight.numel()
    matmul_params = count.activated - embedding
    head = model.lm_head.weight.numel()
    for depth in model.mtp:
        routed = sum(p.numel() for m in depth.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
        unused = routed * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
        matmul_params += sum(p.numel() for p in depth.parameters()) - unused + head
    attention_layers = cfg.num_hidden_layers + len(model.mtp)
    attention = attention_layers * 2 * seq_len * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) / 2
    return 3.0 * (2.0 * matmul_params + attention)


def main(argv: list[str]) -> None:
    from moetron.models import build_model

    name = argv[0] if argv else "v3_671b"
    model = build_model(load_preset(name), device="meta")
    count = count_parameters(model)
    print(f"{name}: total {count.total / 1e9:.2f}B (main model, embedding and head included), "
          f"activated per token {count.activated / 1e9:.2f}B "
          f"({(count.activated - count.embedding_and_head) / 1e9:.2f}B without embedding and head), "
          f"MTP modules {count.mtp / 1e9:.2f}B more")


if __name__ == "__main__":
    main(sys.argv[1:])
