"""Key/value caches for generation: each attention layer keeps what its next tokens attend to.

    with kv_caches(model, state):                       # every attention module gets its cache
        logits = model(ids_BS, samples=state.step(positions_BS, valid_BS))

Grouped-query attention caches its keys (after RoPE) and values. MLA caches what DeepSeek's
inference code does: the normalised compressed latent c^KV (eq. 1) and the decoupled RoPE key k^R
(eq. 3), one of each per token whatever the number of heads, and up-projects keys and values from
them at each step. `DecodeState` holds, for every layer alike, the positions of the cached tokens and
which are real (a batch of prompts of different lengths is left-padded), so that each query sees
the real keys at or before its position (and within a sliding window).

Shape legend: B batch, S new tokens, T cached tokens, K key/value heads, D head dim, C kv_lora_rank,
R rotary dim.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class DecodeState:
    """Positions and validity of the cached tokens, shared by every layer's cache."""

    def __init__(self) -> None:
        self.key_positions_BT: Optional[torch.Tensor] = None
        self.key_valid_BT: Optional[torch.Tensor] = None
        self.query_positions_BS: Optional[torch.Tensor] = None
        self._visible: dict = {}

    def step(self, positions_BS: torch.Tensor, valid_BS: torch.Tensor):
        """Record the next tokens (before the forward that reads them); returns what the model's
        rotary embedding takes their positions from."""
        from moetron.models.common.packed import PackedSamples

        cat = (lambda old, new: new if old is None else torch.cat([old, new], dim=1))
        self.key_positions_BT = cat(self.key_positions_BT, positions_BS)
        self.key_valid_BT = cat(self.key_valid_BT, valid_BS)
        self.query_positions_BS, self._visible = positions_BS, {}
        return PackedSamples(positions_BS, valid_BS)

    def attend(self, q_BNSD: torch.Tensor, k_BNTD: torch.Tensor, v_BNTV: torch.Tensor, scale: float) -> torch.Tensor:
        """The new queries over every cached key (as many heads), each seeing those `visible` to it."""
        return F.scaled_dot_product_attention(q_BNSD, k_BNTD, v_BNTV, attn_mask=self.visible(), scale=scale)

    def visible(self, window: Optional[int] = None) -> torch.Tensor:
        """[B, 1, S, T]: query i sees real key j at or before its position (and within `window`)."""
        if window not in self._visible:
            q_BS1, k_B1T = self.query_positions_BS[:, :, None], self.key_positions_BT[:, None, :]
            seen = self.key_valid_BT[:, None, :] & (k_B1T <= q_BS1)
            if window is not None:
                seen = seen & (k_B1T > q_BS1 - window)
            self._visible[window] = seen.unsqueeze(1)
        return self._visible[window]


class LayerCache:
    """One attention layer's cached tensors, grown along their token dim (dim -2)."""

    recompute = False  # what attends over the slot keeps its keys (no backward runs in generation)

    def __init__(self, state: DecodeState) -> None:
        self.state = state
        self.tensors: Optional[tuple[torch.Tensor, ...]] = None

    def extend(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append the new tokens' tensors; returns the cached ones, these included."""
        if self.tensors is None:
            self.tensors = tuple(new)
        else:
            self.tensors = tuple(torch.cat([old, t], dim=-2) for old, t in zip(self.tensors, new))
        return self.tensors


def key_slot(module: nn.Module, samples):
    """Where an attention module's keys beyond its own tokens come from: its generation cache, or
    the gather of context parallelism (`samples.context`, moetron.models.common.context_parallel);
    None: its own tokens only. A slot has `extend(*local) -> every key's tensors`, `state.visible(window)`
    and `recompute` (whether the attention over it recomputes in backward rather than keep its keys)."""
    if module.kv_cache is not None:
        return module.kv_cache
    context = getattr(samples, "context", None)
    return context.gather if context is not None else None


@contextmanager
def key_slots(model: nn.Module, make):
    """Every attention module of `model` (its `kv_cache` slot: where keys beyond its own tokens come
    from) gets `make()` for the block: a generation cache, or context parallelism's gather."""
    modules = [m for m in model.modules() if hasattr(m, "kv_cache")]
    for module in modules:
        module.kv_cache = make()
    try:
        yield
    finally:
        for module in modules:
            module.kv_cache = None


@contextmanager
def kv_caches(model: nn.Module, state: DecodeState):
    """Give every attention module of `model` a fresh cache for the block."""
    with key_slots(model, lambda: LayerCache(state)):
        yield state
