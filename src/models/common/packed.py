"""Packed samples: several samples in one row, isolated from each other (DeepSeek-V3 report section
5.1: "a sample masking strategy ... ensures these examples remain isolated and mutually invisible").

    samples = PackedSamples(position_ids_BS)      # positions restart at 0 where each sample starts
    logits = model(input_ids_BS, samples=samples)  # each sample's logits equal those of it alone

The boundaries come from the packing, never from the tokens: a sample starts where its position is
0. Rotary embeddings take the positions, attention sees only keys of the query's own sample (and
of a sliding window within it), MTP counts no target that lies in another sample.

Kernels: on a GPU, FlexAttention with a block mask built from the sample ids (blocks that cross no
sample boundary run unmasked, blocks of other samples are skipped); on a CPU, SDPA with a boolean
[B, 1, S, S] mask (exact, and S x S bytes per row).

Shape legend: B batch, S sequence (queries), T keys, N heads, D head dim, V value dim.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F


class PackedSamples:
    """The sample structure of a micro-batch, from its positions [B, S] (0 where a sample starts)."""

    def __init__(self, position_ids_BS: torch.Tensor) -> None:
        if position_ids_BS.dim() != 2:
            raise ValueError(f"position_ids must be [batch, sequence], got {tuple(position_ids_BS.shape)}")
        self.position_ids_BS = position_ids_BS
        self.sample_ids_BS = (position_ids_BS == 0).cumsum(dim=-1)  # the k-th sample of its row
        self._visible: dict = {}
        self._block_masks: dict = {}

    @classmethod
    def of_lengths(cls, lengths: list[list[int]], device=None) -> "PackedSamples":
        """Rows made of samples of these lengths (each row's lengths sum to the sequence length)."""
        rows = [torch.cat([torch.arange(n) for n in row]) for row in lengths]
        if len({len(r) for r in rows}) != 1:
            raise ValueError(f"rows of different lengths: {[len(r) for r in rows]}")
        return cls(torch.stack(rows).to(device))

    def visible(self, window: Optional[int] = None) -> torch.Tensor:
        """[B, 1, S, T] True where query i may see key j: the same sample, j <= i (and i - j < window)."""
        if window not in self._visible:
            ids_BS = self.sample_ids_BS
            q_S1 = torch.arange(ids_BS.shape[1], device=ids_BS.device)[:, None]
            k_1T = q_S1.T
            causal_ST = (k_1T <= q_S1) if window is None else (k_1T <= q_S1) & (k_1T > q_S1 - window)
            self._visible[window] = ((ids_BS[:, :, None] == ids_BS[:, None, :]) & causal_ST).unsqueeze(1)
        return self._visible[window]

    def block_mask(self, window: Optional[int]):
        """FlexAttention's block mask of `visible(window)` (built once per window)."""
        if window not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            ids_BS = self.sample_ids_BS

            def mask_mod(b, h, q, k):
                seen = (ids_BS[b, q] == ids_BS[b, k]) & (k <= q)
                return seen if window is None else seen & (q - k < window)

            B, S = ids_BS.shape
            self._block_masks[window] = create_block_mask(mask_mod, B, None, S, S, device=ids_BS.device)
        return self._block_masks[window]

    def same_sample_ahead(self, k: int) -> torch.Tensor:
        """[B, S] True where position i + k lies in the sample of position i (MTP depth k's target)."""
        ids_BS = self.sample_ids_BS
        ahead_BS = torch.full_like(ids_BS, -1)
        ahead_BS[:, :-k] = ids_BS[:, k:]
        return ahead_BS == ids_BS


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def packed_attention(q_BNSD: torch.Tensor, k_BKTD: torch.Tensor, v_BKTV: torch.Tensor, scale: float,
                     samples: PackedSamples, window: Optional[int] = None) -> torch.Tensor:
    """Causal attention of each query over the keys of its own sample (key/value heads K may be
    fewer than N: grouped-query attention)."""
    gqa = k_BKTD.shape[1] != q_BNSD.shape[1]
    if q_BNSD.is_cuda:
        mask = samples.block_mask(window)
        return _compiled_flex()(q_BNSD, k_BKTD, v_BKTV, block_mask=mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q_BNSD, k_BKTD, v_BKTV, attn_mask=samples.visible(window), scale=scale,
                                          enable_gqa=gqa)
