"""Rows per expert without a host sync: `torch.bincount` sizes its output from the largest id, which
on a GPU waits for the device; a scatter-add into a fixed-size vector does not."""
from __future__ import annotations

import torch


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[num_experts] int64: how often each id in `expert_ids` occurs (ids in [0, num_experts))."""
    ids = expert_ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, ids.long(), torch.ones_like(ids, dtype=torch.int64))
