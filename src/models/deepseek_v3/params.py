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
