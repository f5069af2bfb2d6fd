"""Multi-Token Prediction modules (report section 2.2, eqs. 21-25).

Depth k combines the previous depth's hidden state h^{k-1}_i with the embedding of token t_{i+k}:
h'^k_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))] (eq. 21), runs one transformer block
(eq. 22) and predicts t_{i+k+1} through the main model's output head (eq. 23). The embedding and
head are the main model's own tensors, passed in, never copied. Concatenation follows the paper
([h; emb]); DeepSeek's published checkpoint stores `eh_proj` for [emb; h], so a loader of those
weights swaps the two column halves.

Sequences keep their length: depth k reads tokens shifted left by k and ignores the last k
positions' losses (causal attention keeps the wrapped tail from reaching earlier positions).

Shape legend: B batch, S sequence, H hidden, V vocabulary.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moetron.models.common.decoder_lm import IGNORE_INDEX
from moetron.models.common.norm import RMSNorm
from moetron.models.deepseek_v3.block import decoder_layer
from moetron.models.deepseek_v3.config import DeepSeekV3Config

__all__ = ["IGNORE_INDEX", "MTPModule", "mtp_depths", "shift_left"]


def shift_left(ids_BS: torch.Tensor, k: int, fill: Optional[int] = None) -> torch.Tensor:
    """ids shifted k positions left; the k vacated tail positions get `fill` (or wrap around)."""
    shifted_BS = torch.roll(ids_BS, shifts=-k, dims=1)
    if fill is not None:
        shifted_BS[:, ids_BS.shape[1] - k:] = fill
    return shifted_BS


class MTPModule(nn.Module):
    """One prediction depth: `hnorm`, `enorm`, `eh_proj` (M_k), a MoE `block`, and `norm`, the
    final RMSNorm before the shared head (DeepSeek's `shared_head.norm`)."""

    def __init__(self, cfg: DeepSeekV3Config, layer_idx: int) -> None:
        super().__init__()
        H = cfg.hidden_size
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.block = decoder_layer(cfg, layer_idx, moe=cfg.n_routed_experts > 0)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)

    def forward(self, h_prev_BSH, emb_next_BSH, cos_SR2, sin_SR2, valid_len=None, samples=None):
        """Returns h^k (input of the next depth), its normed form for the head, and the balance loss
        (over the first `valid_len` positions: depth k's last k hold wrapped-around tokens)."""
        merged_BSH = self.eh_proj(torch.cat([self.hnorm(h_prev_BSH), self.enorm(emb_next_BSH)], dim=-1))
        h_BSH, balance_loss = self.block(merged_BSH, cos_SR2, sin_SR2, valid_len, samples)
        return h_BSH, self.norm(h_BSH), balance_loss


def mtp_depths(depths, embed_tokens: nn.Module, h_BSH: torch.Tensor, input_ids_BS: torch.Tensor,
               labels_BS: torch.Tensor, cos_SR2: torch.Tensor, sin_SR2: torch.Tensor, samples=None):
    """Run the MTP depths in order; per depth k yield (normed h^k for the shared head, its targets
    t_{i+k+1} with the last k positions ignored, the block's balance loss or None). With packed
    `samples`, a target whose token t_{i+k} lies in another sample is ignored too."""
    context = samples.context if samples is not None else None  # rows split over ranks: shifts cross them
    shift = context.ahead if context is not None else shift_left
    for k, depth in enumerate(depths, start=1):
        emb_next_BSH = embed_tokens(shift(input_ids_BS, k))  # Emb(t_{i+k})
        # the last k positions of a row do not count in the routers (under context parallelism the
        # samples' `ahead` says which they are on this rank)
        valid_len = input_ids_BS.shape[1] - k if context is None else None
        h_BSH, normed_BSH, balance = depth(h_BSH, emb_next_BSH, cos_SR2, sin_SR2, valid_len,
                                           samples.ahead(k) if samples is not None else None)
        labels_k_BS = shift(labels_BS, k, fill=IGNORE_INDEX)
        if samples is not None:
            labels_k_BS = labels_k_BS.masked_fill(~samples.same_sample_ahead(k), IGNORE_INDEX)
        yield normed_BSH, labels_k_BS, balance
