"""Grouped-query attention (Ainslie et al. 2023), with what the families here add to it: per-head
q/k RMSNorm before the rotary embedding (Qwen3), biases on the projections (GPT-OSS), a sliding
window (Mistral/Mixtral, GPT-OSS's alternate layers) and learned per-head attention sinks (GPT-OSS:
one more logit in each softmax row whose value is dropped, so a head may attend to nothing).

N query heads share N / N_kv key/value heads. Rotary positions use the half-split (Llama) layout:
x[j] rotates with x[j + D/2] (moetron.models.common.rope.apply_rotary, interleave False).
Scores are scaled by head_dim^-0.5 and computed causally through torch SDPA; with sinks the
softmax is written out (SDPA has no extra column).

Shape legend: B batch, S sequence (queries), T keys, H hidden, N query heads, K key/value heads,
D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetron.models.common.costs import CoreCost
from moetron.models.common.kv_cache import key_slot
from moetron.models.common.norm import RMSNorm
from moetron.models.common.packed import PackedSamples, packed_attention
from moetron.models.common.rope import apply_rotary


@dataclass(frozen=True)
class AttentionSettings:
    """A family's attention; its config says it (each layer's may differ: a sliding window)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False  # biases on q_proj, k_proj, v_proj
    o_bias: bool = False  # a bias on o_proj
    qk_norm: bool = False  # RMSNorm over each head's q and k before the rotary embedding (Qwen3)
    rms_norm_eps: float = 1e-6
    sliding_window: Optional[int] = None  # a query sees itself and the window - 1 keys before it
    sinks: bool = False  # a learned logit per head in every softmax row (GPT-OSS)

    def mean_keys(self, seq_len: int) -> float:
        """Keys a query attends to on average (causal: S / 2, the convention of the FLOPs here)."""
        w = self.sliding_window
        if w is None or w >= seq_len:
            return seq_len / 2
        return w - w * w / (2 * seq_len)  # the mean of min(position, w) over the sequence


def causal_window_mask(seq_len: int, window: int, device) -> torch.Tensor:
    """[S, T] True where query i may see key j: i - window < j <= i."""
    q_S1 = torch.arange(seq_len, device=device)[:, None]
    k_1T = torch.arange(seq_len, device=device)[None, :]
    return (k_1T <= q_S1) & (k_1T > q_S1 - window)


@torch.overrides.wrap_torch_function(lambda q_BNSD, k_BNTD, v_BNTD, *rest, **kw: (q_BNSD, k_BNTD, v_BNTD))
def attention_with_sinks(q_BNSD, k_BNTD, v_BNTD, scale: float, sinks_N: torch.Tensor,
                         window: Optional[int], visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax([q k^T * scale, sink]) without the sink's column, times v (GPT-OSS's attention);
    `visible` ([S, T] or [B, 1, S, T]; default causal within `window`) says which keys a query sees.
    A torch function (a TorchFunctionMode sees it, as moetron.plan.memory's fused-kernel stand-in)."""
    S = q_BNSD.shape[2]
    groups = q_BNSD.shape[1] // k_BNTD.shape[1]
    k_BNTD, v_BNTD = k_BNTD.repeat_interleave(groups, dim=1), v_BNTD.repeat_interleave(groups, dim=1)
    scores_BNST = (q_BNSD @ k_BNTD.transpose(-2, -1)) * scale
    if visible is None:
        visible = causal_window_mask(S, window if window is not None else S, q_BNSD.device)
    scores_BNST = scores_BNST.masked_fill(~visible, float("-inf"))
    sink_BNS1 = sinks_N.to(scores_BNST.dtype).view(1, -1, 1, 1).expand(*scores_BNST.shape[:3], 1)
    logits_BNS_T1 = torch.cat([scores_BNST, sink_BNS1], dim=-1)
    logits_BNS_T1 = logits_BNS_T1 - logits_BNS_T1.max(dim=-1, keepdim=True).values
    probs_BNST = logits_BNS_T1.softmax(dim=-1)[..., :-1]
    return probs_BNST.to(v_BNTD.dtype) @ v_BNTD


class GroupedQueryAttention(nn.Module):
    """Parameter names follow transformers' Qwen3MoeAttention / MixtralAttention / GptOssAttention:
    `q_proj`, `k_proj`, `v_proj`, `o_proj`, optional `q_norm`, `k_norm`, `sinks`."""

    def __init__(self, settings: AttentionSettings) -> None:
        super().__init__()
        s = self.settings = settings
        H, N, K, D = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim
        self.q_proj = nn.Linear(H, N * D, bias=s.qkv_bias)
        self.k_proj = nn.Linear(H, K * D, bias=s.qkv_bias)
        self.v_proj = nn.Linear(H, K * D, bias=s.qkv_bias)
        self.o_proj = nn.Linear(N * D, H, bias=s.o_bias)
        if s.qk_norm:
            self.q_norm = RMSNorm(D, s.rms_norm_eps)
            self.k_norm = RMSNorm(D, s.rms_norm_eps)
        self.sinks = nn.Parameter(torch.empty(N)) if s.sinks else None
        self.kv_cache = None  # a slot generation sets (moetron.models.common.kv_cache)

    def core_cost(self, seq_len: int, recompute: bool = False) -> CoreCost:
        """Per token: 2 x the mean keys seen x heads x (q.k and p.v) head dims; nothing recomputed."""
        s = self.settings
        return CoreCost(2.0 * s.mean_keys(seq_len) * s.num_heads * 2 * s.head_dim,
                        context_bytes=2.0 * 2 * s.num_kv_heads * s.head_dim, context_mask=True)

    def forward(self, x_BSH: torch.Tensor, cos_SR2: torch.Tensor, sin_SR2: torch.Tensor,
                samples: Optional[PackedSamples] = None) -> torch.Tensor:
        """`samples`: packed samples, each attending only to itself (else one causal sequence per row)."""
        s = self.settings
        B, S, _ = x_BSH.shape
        q_BSND = self.q_proj(x_BSH).view(B, S, s.num_heads, s.head_dim)
        k_BSKD = self.k_proj(x_BSH).view(B, S, s.num_kv_heads, s.head_dim)
        v_BKSD = self.v_proj(x_BSH).view(B, S, s.num_kv_heads, s.head_dim).transpose(1, 2)
        if s.qk_norm:
            q_BSND, k_BSKD = self.q_norm(q_BSND), self.k_norm(k_BSKD)
        q_BNSD = apply_rotary(q_BSND.transpose(1, 2), cos_SR2, sin_SR2, interleave=False)
        k_BKSD = apply_rotary(k_BSKD.transpose(1, 2), cos_SR2, sin_SR2, interleave=False)
        scale = s.head_dim ** -0.5
        slot = key_slot(self, samples)
        if slot is not None:  # generation's cache or context parallelism's gather: keys beyond these tokens
            k_BKSD, v_BKSD = slot.extend(k_BKSD, v_BKSD)
            visible = slot.state.visible(s.sliding_window)
            if self.sinks is not None:
                out_BNSD = attention_with_sinks(q_BNSD, k_BKSD, v_BKSD, scale, self.sinks, s.sliding_window, visible)
            else:
                out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BKSD, v_BKSD, attn_mask=visible, scale=scale,
                                                          enable_gqa=True)
        elif self.sinks is not None:
            visible = samples.visible(s.sliding_window) if samples is not None else None
            out_BNSD = attention_with_sinks(q_BNSD, k_BKSD, v_BKSD, scale, self.sinks, s.sliding_window, visible)
        elif samples is not None:
            out_BNSD = packed_attention(q_BNSD, k_BKSD, v_BKSD, scale, samples, s.sliding_window)
        elif s.sliding_window is not None and s.sliding_window < S:
            mask_ST = causal_window_mask(S, s.sliding_window, x_BSH.device)
            out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BKSD, v_BKSD, attn_mask=mask_ST, scale=scale,
                                                      enable_gqa=True)
        else:
            out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BKSD, v_BKSD, is_causal=True, scale=scale,
                                                      enable_gqa=True)
        return self.o_proj(out_BNSD.transpose(1, 2).reshape(B, S, -1))
