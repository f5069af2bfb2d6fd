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

    def __init__(self, position_ids_BS: torch.Tensor, real_BS: Optional[torch.Tensor] = None,
                 context=None) -> None:
        """`real_BS`: True on the tokens of samples, False on a row's padding (None: no padding); the
        routers count only real tokens in their loads and balance losses. `context`: the rows are
        split over context-parallel ranks (moetron.models.common.context_parallel.ContextState),
        which answers what crosses a row (MTP's shifts)."""
        if position_ids_BS.dim() != 2:
            raise ValueError(f"position_ids must be [batch, sequence], got {tuple(position_ids_BS.shape)}")
        self.position_ids_BS, self.real_BS, self.context = position_ids_BS, real_BS, context
        self.sample_ids_BS = (position_ids_BS == 0).cumsum(dim=-1)  # the k-th sample of its row
        self._visible: dict = {}
        self._block_masks: dict = {}

    def ahead(self, k: int) -> "PackedSamples":
        """The same rows for MTP depth k: a position counts in the routers only if it is real and
        its token k ahead lies in its own sample (the masks are shared, not rebuilt)."""
        view = PackedSamples.__new__(PackedSamples)
        view.__dict__.update(self.__dict__)
        counted_BS = self.same_sample_ahead(k)
        view.real_BS = counted_BS if self.real_BS is None else counted_BS & self.real_BS
        return view

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

    def block_mask(self, window: Optional[int], block: int = 128):
        """FlexAttention's block mask of `visible(window)`, built from each block's span of sample
        ids (never an S x S tensor: long rows cost (S / block)^2 bools), once per window."""
        if window not in self._block_masks:
            from torch.nn.attention.flex_attention import BlockMask

            ids_BS = self.sample_ids_BS

            def mask_mod(b, h, q, k):
                seen = (ids_BS[b, q] == ids_BS[b, k]) & (k <= q)
                return seen if window is None else seen & (q - k < window)

            partial_BQK, full_BQK = block_structure(ids_BS, window, block)
            S = ids_BS.shape[1]
            self._block_masks[window] = BlockMask.from_kv_blocks(
                *_kv_blocks(partial_BQK), *_kv_blocks(full_BQK), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(S, S))
        return self._block_masks[window]

    def same_sample_ahead(self, k: int) -> torch.Tensor:
        """[B, S] True where position i + k lies in the sample of position i (MTP depth k's target)."""
        if self.context is not None:
            return self.context.same_sample_ahead(k)
        ids_BS = self.sample_ids_BS
        ahead_BS = torch.full_like(ids_BS, -1)
        ahead_BS[:, :-k] = ids_BS[:, k:]
        return ahead_BS == ids_BS


def block_structure(ids_BS: torch.Tensor, window: Optional[int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, Q, K] blocks some of whose pairs are visible but not all, [B, Q, K] blocks all of whose
    pairs are): query block q, key block k, from each block's first and last index and sample id
    (sample ids never decrease along a row, so a block holds every id between its first and last)."""
    B, S = ids_BS.shape
    n = -(-S // block)
    padded_BN = F.pad(ids_BS, (0, n * block - S))
    padded_BN[:, S:] = ids_BS[:, -1:]  # the last block's tail: the last sample, never read
    blocks_BNC = padded_BN.view(B, n, block)
    lo_BN, hi_BN = blocks_BNC[..., 0], blocks_BNC[..., -1]  # the first and last sample id of each block
    start_N = torch.arange(n, device=ids_BS.device) * block
    end_N = torch.clamp(start_N + block - 1, max=S - 1)
    q_start, q_end, k_start, k_end = start_N[:, None], end_N[:, None], start_N[None, :], end_N[None, :]
    shared_BQK = (lo_BN[:, None, :] <= hi_BN[:, :, None]) & (hi_BN[:, None, :] >= lo_BN[:, :, None])
    one_sample_BQK = (lo_BN == hi_BN)[:, :, None] & (lo_BN == hi_BN)[:, None, :] & \
        (lo_BN[:, :, None] == lo_BN[:, None, :])
    some_QK, all_QK = k_start <= q_end, k_end <= q_start
    if window is not None:
        some_QK = some_QK & (q_start - k_end < window)
        all_QK = all_QK & (q_end - k_start < window)
    full_BQK = one_sample_BQK & all_QK
    return shared_BQK & some_QK & ~full_BQK, full_BQK


def _kv_blocks(blocks_BQK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks [B, 1, Q], kv_indices [B, 1, Q, K]) of a block mask, as BlockMask takes them."""
    order_BQK = torch.argsort((~blocks_BQK).to(torch.int8), dim=-1, stable=True)
    return blocks_BQK.sum(dim=-1, dtype=torch.int32).unsqueeze(1), order_BQK.to(torch.int32).unsqueeze(1)


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
