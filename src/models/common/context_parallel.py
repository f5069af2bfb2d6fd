"""Context parallelism: each sequence split over the ranks of a context-parallel group, every rank
running every layer on its own tokens; attention alone reads across ranks.

    split = SequenceSplit(cp_group, rank, cp)               # the trainer's (its lanes under DualPipe)
    local_BS, labels_BS, samples = split.shard(ids_BS, labels_BS)   # chunks r and 2cp - 1 - r of each row
    with context_parallel(model, split.group):              # routers sum balance statistics over cp
        out = model(local_BS, labels_BS, samples=samples, loss_denominator=counted_targets / cp)
        # the cp ranks then average their gradients, as data ranks do

The rows' `ContextState` travels with the micro-batch in `samples.context` (so a pipeline's
micro-batches in flight each carry their own); every attention module reads its keys through it
(`moetron.models.common.kv_cache.key_slot`).

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
layer and sequence); the backward reduce-scatters their gradients (moetron.comm.sequence). MLA
recomputes its up-projection and attention in backward rather than keep the whole row's keys and
values (80 KiB per token and layer at V3, whatever cp is); what each rank keeps of other ranks' tokens
is their latent. The price: every rank up-projects the whole row's keys and values, twice (forward
and backward; kv_b_proj's 33.5 MFLOP per token at V3, x cp per local token). Grouped-query attention
keeps the gathered keys and values (SDPA saves them). MLA attends each of its two chunks over the
row's keys up to the chunk's end, causal from the lower right (no mask); packed samples, sliding
windows and GQA take a dense [B, 1, S, T] mask for SDPA (S x T bytes per row; FlexAttention's block
mask on GPUs is to come).

Shape legend: B batch, S local tokens, T tokens of the whole row, K kv heads, D head dim.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from moetron.comm.lanes import GroupLike, resolve
from moetron.comm.sequence import gather_sequence
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

    def __init__(self, query_positions_BS: torch.Tensor, group: GroupLike) -> None:
        """`query_positions_BS`: the positions of this rank's tokens (its `shard_sequence` of the
        rows' positions; packed rows restart them at 0 where each sample starts); `group`: the cp
        ranks (a process group, its lanes, or None: every rank)."""
        self.group = group
        self.rank, self.cp = dist.get_rank(resolve(group)), dist.get_world_size(resolve(group))
        self.gather = ContextGather(self)  # every attention layer's key slot
        self._rows: dict = {}  # id(tensor) -> (tensor, its whole rows): `whole_rows`
        self.query_positions_BS = query_positions_BS
        B, S = query_positions_BS.shape
        self.row_len = S * self.cp
        # where this rank's tokens, and (gathered in rank order) every rank's, lie in the whole row
        self.row_index_S = shard_sequence(torch.arange(self.row_len, device=query_positions_BS.device)[None],
                                          self.rank, self.cp)[0]
        with torch.no_grad():
            self.key_positions_BT = gather_sequence(query_positions_BS, 1, group)
            self.gathered_index_T = gather_sequence(self.row_index_S, 0, group)
            # one sequence per row (each position its index in the row): causal attention needs no mask
            self.plain = torch.equal(self.key_positions_BT, self.gathered_index_T.expand_as(self.key_positions_BT))
            # the sample of each token, counted over its whole row (a sample starts at position 0)
            self.query_samples_BS = (self.whole_rows(query_positions_BS) == 0).cumsum(dim=1)[:, self.row_index_S]
            self.key_samples_BT = gather_sequence(self.query_samples_BS, 1, group)
        # masks by window, held only while autograd keeps them for a backward (or one forward uses
        # them): a pipeline's micro-batches keep their states for the whole step
        self._visible: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def whole_rows(self, x_BS: torch.Tensor) -> torch.Tensor:
        """[B, row_len] every rank's `x` in row order (no gradient); gathered once per tensor (MTP
        shifts the same ids, labels and sample ids at every depth)."""
        known = self._rows.get(id(x_BS))
        if known is not None and known[0] is x_BS:
            return known[1]
        with torch.no_grad():
            gathered_BT = gather_sequence(x_BS, 1, self.group)
        rows_BT = torch.empty_like(gathered_BT)
        rows_BT[:, self.gathered_index_T] = gathered_BT
        self._rows[id(x_BS)] = (x_BS, rows_BT)
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

    def attend(self, q_BNSD: torch.Tensor, k_BNTD: torch.Tensor, v_BNTV: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention of this rank's queries over the gathered keys (as many heads). Rows of
        one sequence each: per chunk, its queries over the row's keys up to the chunk's end, causal
        from the lower right (torch's CausalBias: fused kernels on GPUs, no [S, T] mask); else the
        dense mask of `visible` (packed samples)."""
        if not self.plain:
            return F.scaled_dot_product_attention(q_BNSD, k_BNTD, v_BNTV, attn_mask=self.visible(), scale=scale)
        order_T = torch.argsort(self.gathered_index_T)  # gathered (rank-major) -> row order
        k_BNTD, v_BNTV = k_BNTD.index_select(-2, order_T), v_BNTV.index_select(-2, order_T)
        size = q_BNSD.shape[-2] // 2
        outs = []
        for i, (_, end) in enumerate(chunk_bounds(self.row_len, self.rank, self.cp)):
            q_chunk = q_BNSD.narrow(-2, i * size, size)
            outs.append(F.scaled_dot_product_attention(q_chunk, k_BNTD[..., :end, :], v_BNTV[..., :end, :],
                                                       attn_mask=causal_lower_right(size, end), scale=scale))
        return torch.cat(outs, dim=-2)

    def visible(self, window: Optional[int] = None) -> torch.Tensor:
        """[B, 1, S, T]: a query sees the keys at or before its position (within `window`), of its sample."""
        mask_B1ST = self._visible.get(window)
        if mask_B1ST is None:
            q_BS1, k_B1T = self.query_positions_BS[:, :, None], self.key_positions_BT[:, None, :]
            seen = (k_B1T <= q_BS1) & (self.query_samples_BS[:, :, None] == self.key_samples_BT[:, None, :])
            if window is not None:
                seen = seen & (k_B1T > q_BS1 - window)
            mask_B1ST = self._visible[window] = seen.unsqueeze(1)
        return mask_B1ST


class ContextGather:
    """The attention layers' key slot under context parallelism: `extend` returns every rank's
    tensors along the token dim (-2), gathered with autograd."""

    recompute = True  # MLA up-projects the gathered latent again in backward (see the module docstring)

    def __init__(self, state: ContextState) -> None:
        self.state = state

    def extend(self, *local: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(gather_sequence(t, t.dim() - 2, self.state.group) for t in local)


class SequenceSplit:
    """This rank's share of each micro-batch's rows, for the cp ranks of `group` (its lanes)."""

    def __init__(self, group: GroupLike, rank: int, cp: int) -> None:
        self.group, self.rank, self.cp = group, rank, cp

    def shard(self, inputs_BS: torch.Tensor, labels_BS: torch.Tensor, positions_BS: Optional[torch.Tensor] = None,
              real_BS: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, PackedSamples]:
        """(my tokens, my labels, their samples: positions for RoPE and the rows' ContextState) of
        whole rows; `positions_BS` None: one sequence per row."""
        if positions_BS is None:
            positions_BS = torch.arange(inputs_BS.shape[1], device=inputs_BS.device).expand_as(inputs_BS)
        mine = lambda x_BS: shard_sequence(x_BS, self.rank, self.cp)  # noqa: E731
        state = ContextState(mine(positions_BS), self.group)
        return mine(inputs_BS), mine(labels_BS), state.samples(mine(real_BS) if real_BS is not None else None)


def set_context_group(model: nn.Module, group: GroupLike) -> None:
    """Every router of `model` sums its rows' balance statistics over the cp ranks of `group` (None: off)."""
    for module in model.modules():
        if hasattr(module, "context_group"):
            module.context_group = group


@contextmanager
def context_parallel(model: nn.Module, group: GroupLike):
    """`set_context_group` for the block (the trainer sets it once:
    moetron.models.common.parallelize.connect_context)."""
    set_context_group(model, group)
    try:
        yield
    finally:
        set_context_group(model, None)
