"""The SwiGLU feed-forward (Shazeer 2020): dense layers' FFN and shared experts.

Shape legend: B batch, S sequence, H hidden, I FFN width.
"""
from __future__ import annotations

import torch
from torch import nn

from moetron.core.activations import swiglu
from moetron.parallel.recompute import discard_all, maybe_recompute

__all__ = ["MLP", "swiglu"]


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers' FFN and the shared experts (their widths summed)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.recompute_swiglu = False  # a slot the recompute converter sets
        self.activation = swiglu  # a converter may hand in another (FP8: inputs cached in FP8)
        self.recompute_inputs = None  # how a recompute region keeps the inputs (FP8: as tiles); None: as they are

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        act_BSI, region = maybe_recompute(self.recompute_swiglu, self.activation, self.gate_proj(x_BSH),
                                          self.up_proj(x_BSH), keep=self.recompute_inputs)
        out_BSH = self.down_proj(act_BSI)
        discard_all([region], after=out_BSH)
        return out_BSH
