"""One pre-norm transformer block, the decoder layer of every family here: x + attn(norm(x)), then
+ ffn(norm(.)), where ffn is a dense MLP or an MoE layer (moetron.models.common.moe).

Shape legend: B batch, S sequence, H hidden, R rotary dim.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moetron.models.common.moe import MoE
from moetron.parallel.recompute import discard_all, maybe_recompute


class DecoderLayer(nn.Module):
    """Names follow transformers' decoder layers (DeepseekV3DecoderLayer, Qwen3MoeDecoderLayer...):
    `input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`. `self_attn(x, cos, sin, samples)`
    takes the rotary tables; an attention of its own positions (a sliding window, sinks) holds them.

    With `recompute_norm` (a slot the recompute converter sets), each norm's output is freed once its
    consumers have run and recomputed in backward (see `moetron.parallel.recompute`).
    """

    def __init__(self, layer_idx: int, input_layernorm: nn.Module, self_attn: nn.Module,
                 post_attention_layernorm: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp
        self.recompute_norm = False

    def forward(self, x_BSH: torch.Tensor, cos_SR2: torch.Tensor, sin_SR2: torch.Tensor,
                valid_len: Optional[int] = None, samples=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns the block output and the MoE balance loss (None for dense blocks / no loss);
        `valid_len`: the positions that count in the router's loads and balance loss; `samples`:
        packed samples (moetron.models.common.packed), each attending only to itself."""
        recompute = self.recompute_norm
        normed_BSH, region = maybe_recompute(recompute, self.input_layernorm, x_BSH)
        attn_BSH = self.self_attn(normed_BSH, cos_SR2, sin_SR2, samples)
        discard_all([region], after=attn_BSH)
        x_BSH = x_BSH + attn_BSH

        normed_BSH, region = maybe_recompute(recompute, self.post_attention_layernorm, x_BSH)
        if isinstance(self.mlp, MoE):
            ffn_BSH, balance_loss = self.mlp(normed_BSH, valid_len, samples.real_BS if samples is not None else None)
        else:
            ffn_BSH, balance_loss = self.mlp(normed_BSH), None
        discard_all([region], after=ffn_BSH)
        return x_BSH + ffn_BSH, balance_loss
