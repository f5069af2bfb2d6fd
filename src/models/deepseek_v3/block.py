"""One transformer block of DeepSeek-V3: pre-norm MLA, then pre-norm dense FFN or DeepSeekMoE.

Shape legend: B batch, S sequence, H hidden, R rotary dim.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moetron.models.deepseek_v3.config import DeepSeekV3Config
from moetron.models.deepseek_v3.layers import MLP, RMSNorm
from moetron.models.deepseek_v3.mla import MLA
from moetron.models.deepseek_v3.moe import MoE
from moetron.parallel.recompute import discard_all, maybe_recompute


class DecoderLayer(nn.Module):
    """x + MLA(norm(x)), then + FFN(norm(.)); names follow transformers' DeepseekV3DecoderLayer.

    With `recompute_norm` (a slot the recompute converter sets), each norm's output is freed once its
    consumers have run and recomputed in backward (see `moetron.parallel.recompute`).
    """

    def __init__(self, cfg: DeepSeekV3Config, layer_idx: int, moe: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, layer_idx) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.recompute_norm = False

    def forward(self, x_BSH: torch.Tensor, cos_SR2: torch.Tensor, sin_SR2: torch.Tensor,
                valid_len: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns the block output and the MoE balance loss (None for dense blocks / no loss);
        `valid_len`: the positions that count in the router's loads and balance loss."""
        recompute = self.recompute_norm
        normed_BSH, region = maybe_recompute(recompute, self.input_layernorm, x_BSH)
        attn_BSH = self.self_attn(normed_BSH, cos_SR2, sin_SR2)
        discard_all([region], after=attn_BSH)
        x_BSH = x_BSH + attn_BSH

        normed_BSH, region = maybe_recompute(recompute, self.post_attention_layernorm, x_BSH)
        if isinstance(self.mlp, MoE):
            ffn_BSH, balance_loss = self.mlp(normed_BSH, valid_len)
        else:
            ffn_BSH, balance_loss = self.mlp(normed_BSH), None
        discard_all([region], after=ffn_BSH)
        return x_BSH + ffn_BSH, balance_loss
