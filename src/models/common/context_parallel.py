"""Context parallelism: each sequence split over the ranks of a context-parallel group, every rank
running every layer on its own tokens; attention alone reads across ranks.

    local_BS = shard_sequence(ids_BS, rank, cp)             # chunks r and 2cp - 1 - r of each row
    positions_BS = shard_sequence(positions_BS, rank, cp)
    state = ContextState(positions_BS, cp_group)
    with context_parallel(model, state):
        logits_BSV = model(local_BS, samples=state.samples())      # this rank's rows of the whole
        out = model(local_BS, shard_sequence(labels_BS, rank, cp), samples=state.samples(),
                    loss_denominator=counted_targets / cp)       # the cp ranks then average, as data ranks

Beyond attention, what crosses a row: MTP depth k's tokens and targets k positions ahead
(`ContextState.ahead`, from the row's ids gathered: a few bytes per token), which positions count in
its routers (the last k of the whole row do not), and the balance losses, whose per-row (sequence-
wise) or per-batch (classic) statistics are summed over the ranks (moetron.models.common.balance;
their gradient scaled for ranks that average theirs). The LM loss needs only its denominator: the
whole batch's counted targets, divided by cp since the ranks' losses are averaged.

Balance: the row is cut into 2 x cp chunks and rank r holds chunk r and chunk 2cp - 1 - r, so every
rank holds as many early (cheap) as late (dear) queries of causal attention.

What crosses ranks, per token and layer, through the attention module's key slot (the one
generation's KV cache uses: moetron.models.common.kv_cache): MLA gathers what DeepSeek's inference
caches, the normalised compressed latent c^KV and the rotated decoupled key k^R (kv_lora_rank +
qk_rope_head_dim values: 512 + 64 = 576 at DeepSeek-V3), and up-projects keys and values locally;
grouped-query attention gathers its rotated keys and values (2 x kv heads x head dim: 1,024 values at
Qwen3-30B-A3B and GPT-OSS-120B, 2,048 at Mixtral-8x7B). In BF16 that is 1,152 bytes per token and
layer for MLA against 2,048-4,096 for GQA, and against 128 heads x (192 + 128) x 2 = 81,920 had MLA
sent its up-projected keys and values. Gathering them all, rather than passing them around a ring,
keeps one collective per layer and lets each rank attend with one kernel (a ring's step-by-step
exchange pays off when the gathered keys no longer fit: at 128K tokens MLA's latent is 144 MiB per
layer and sequence); the backward reduce-scatters their gradients (moetron.comm.sequence). Not yet:
each rank up-projects the whole row's keys and values from the latent and keeps them for the
backward (80 KiB per token and layer at V3, whatever cp is: `recompute.mla_up_proj` does not reach
this path yet), and the mask is a dense [B, 1, S, T] one for SDPA (FlexAttention's block mask on
GPUs is to come).

Shape legend: B batch, S local tokens, T tokens of the whole row, K kv heads, D head dim.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moetron.comm.sequence import gather_sequence
from moetron.models.common.kv_cache import key_slots
from moetron.models.common.packed import PackedSamples


def chunk_bounds(seq_len: int, rank: int, cp: int) -> list[tuple[int, int]]:
    """[start, end) of the two chunks rank `rank` of `cp` holds of a row of `seq_len` tokens."""
    if seq_len % (2 * cp):
        raise ValueError(f"a sequence of {seq_len} tokens cannot be cut into 2 x cp = {2 * cp} equal chunks; "
                         f"make train.seq_len a multiple of {2 * cp}")
    size = seq_len // (2 * cp)
    return [(rank * size, (rank + 1) * size), ((2 * cp - 1 - rank) * size, (2 * cp - rank) * size)]


def shard_sequence(x_BS: torch.Tensor, rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of `x` along `dim`: its head chunk, then its tail chunk."""
    return torch.cat([x_BS.narrow(dim, a, b - a) for a, b in chunk_bounds(x_BS.shape[dim], rank, cp)], dim=dim)


class ContextState:
    """Where this rank's queries and every rank's keys lie in their rows, shared by every layer."""

    def __init__(self, query_positions_BS: torch.Tensor, group) -> None:
        """`query_positions_BS`: the positions of this rank's tokens (its `shard_sequence` of the
        rows' positions; packed rows restart them at 0 where each sample starts)."""
        self.group = group if group is not None else dist.group.WORLD  # None: every rank
        self.rank, self.cp = dist.get_rank(group), dist.get_world_size(group)
        self.query_positions_BS = query_positions_BS
        B, S = query_positions_BS.shape
        self.row_len = S * self.cp
        # where this rank's tokens, and (gathered in rank order) every rank's, lie in the whole row
        self.row_index_S = shard_sequence(torch.arange(self.row_len, device=query_positions_BS.device)[None],
                                          self.rank, self.cp)[0]
        with torch.no_grad():
            self.key_positions_BT = gather_sequence(query_positions_BS, 1, group)
            self.gathered_index_T = gather_sequence(self.row_index_S, 0, group)
            # the sample of each token, counted over its whole row (a sample starts at position 0)
            self.query_samples_BS = (self.whole_rows(query_positions_BS) == 0).cumsum(dim=1)[:, self.row_index_S]
            self.key_samples_BT = gather_sequence(self.query_samples_BS, 1, group)
        self._visible: dict = {}

    def whole_rows(self, x_BS: torch.Tensor) -> torch.Tensor:
        """[B, row_len] every rank's `x` in row order (no gradient)."""
        with torch.no_grad():
            gathered_BT = gather_sequence(x_BS, 1, self.group)
        rows_BT = torch.empty_like(gathered_BT)
        rows_BT[:, self.gathered_index_T] = gathered_BT
        return rows_BT

    def ahead(self, x_BS: torch.Tensor, k: int, fill: Optional[int] = None) -> torch.Tensor:
        """The value k positions further along each whole row at each of this rank's tokens (the
        last k of a row get `fill`, or wrap around): `shift_left` of rows split over the ranks."""
        rows_BT = self.whole_rows(x_BS)
        index_S = self.row_index_S + k
        ahead_BS = rows_BT[:, index_S % self.row_len]
        if fill is not None:
            ahead_BS = ahead_BS.masked_fill((index_S >= self.row_len)[None], fill)
        return ahead_BS

    def samples(self, real_BS: Optional[torch.Tensor] = None):
        """The PackedSamples this rank's forward takes: its tokens' positions (for RoPE), which of
        them are real, and this state for what crosses the rows (MTP's shifts)."""
        return PackedSamples(self.query_positions_BS, real_BS, context=self)

    def same_sample_ahead(self, k: int) -> torch.Tensor:
        """[B, S] True where the token k further along the whole row exists and is of the same sample."""
        return self.ahead(self.query_samples_BS, k, fill=-1) == self.query_samples_BS

    def visible(self, window: Optional[int] = None) -> torch.Tensor:
        """[B, 1, S, T]: a query sees the keys at or before its position (within `window`), of its sample."""
        if window not in self._visible:
            q_BS1, k_B1T = self.query_positions_BS[:, :, None], self.key_positions_BT[:, None, :]
            seen = (k_B1T <= q_BS1) & (self.query_samples_BS[:, :, None] == self.key_samples_BT[:, None, :])
            if window is not None:
                seen = seen & (k_B1T > q_BS1 - window)
            self._visible[window] = seen.unsqueeze(1)
        return self._visible[window]


class ContextGather:
    """One attention layer's key slot under context parallelism: `extend` returns every rank's
    tensors along the token dim (-2), gathered with autograd."""

    def __init__(self, state: ContextState) -> None:
        self.state = state

    def extend(self, *local: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(gather_sequence(t, t.dim() - 2, self.state.group) for t in local)


@contextmanager
def context_parallel(model: nn.Module, state: ContextState):
    """Every attention module of `model` reads its keys across the context-parallel group in the block."""
    routers = [m for m in model.modules() if hasattr(m, "context_group")]
    for router in routers:  # the sequence-wise balance loss sums each row's statistics over the ranks
        router.context_group = state.group
    try:
        with key_slots(model, lambda: ContextGather(state)):
            yield state
    finally:
        for router in routers:
            router.context_group = None
