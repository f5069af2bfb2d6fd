"""Multi-head Latent Attention (DeepSeek-V3 report eqs. 1-11; DeepSeek-V2 section 2.1).

Queries and keys/values are compressed to low-rank latents c^Q (eq. 6) and c^KV (eq. 1), each
RMS-normalised, then up-projected per head (eqs. 2, 5, 7). Position enters through a decoupled
rotary part: per-head q^R (eq. 8) and one key k^R shared by all heads (eq. 3). Scores are scaled by
1 / sqrt(qk_nope + qk_rope) and computed causally through torch SDPA (eqs. 9-11).

Shape legend: B batch, S sequence, H hidden, N heads, D per-head dim, C kv_lora_rank, Q q_lora_rank,
R qk_rope_head_dim, P qk_nope_head_dim, V v_head_dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetron.models.common.costs import CoreCost
from moetron.models.common.kv_cache import key_slot
from moetron.models.common.norm import RMSNorm
from moetron.models.common.packed import PackedSamples, packed_attention
from moetron.models.common.rope import apply_rotary, softmax_scale_factor
from moetron.parallel.recompute import discard_all, maybe_recompute


def context_costs(cfg) -> dict:
    """What context parallelism costs MLA per token (CoreCost's fields): the BF16 latent and RoPE key
    its gather moves, and the key/value up-projection every cp rank runs for every token of the row."""
    kv_up_proj = 2.0 * cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return {"context_bytes": 2.0 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim), "context_flops": kv_up_proj}


class MLA(nn.Module):
    """Multi-head Latent Attention; parameter names follow transformers' DeepseekV3Attention. `cfg` is
    any config with transformers' MLA fields (DeepSeek-V2's and V3's): hidden_size,
    num_attention_heads, q_lora_rank (None: an uncompressed query, as V2-Lite), kv_lora_rank,
    qk_nope_head_dim, qk_rope_head_dim, qk_head_dim, v_head_dim, rms_norm_eps, rope_interleave,
    rope_scaling."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        H, N = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, N * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, N * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, N * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        # slots the recompute converter sets (moetron.parallel.recompute.SelectiveRecompute)
        self.recompute_norm = False
        self.recompute_mla_up_proj = False
        self.o_proj = nn.Linear(N * cfg.v_head_dim, H, bias=False)
        self.kv_cache = None  # a slot generation sets (moetron.models.common.kv_cache)

    def core_cost(self, seq_len: int, recompute: bool = False) -> CoreCost:
        """Causal: S / 2 keys per query, q and k of qk_head_dim, v of v_head_dim per head. Under
        recompute (recompute.mla_up_proj) the up-projections run again in the backward."""
        cfg = self.cfg
        N, q_lat = cfg.num_attention_heads, cfg.q_lora_rank or 0
        up_proj = cfg.kv_lora_rank * N * (cfg.qk_nope_head_dim + cfg.v_head_dim) + q_lat * N * cfg.qk_head_dim
        flops = 2.0 * seq_len / 2 * N * (cfg.qk_head_dim + cfg.v_head_dim)
        return CoreCost(flops, 2.0 * up_proj if recompute else 0.0, **context_costs(cfg))

    def _up_project(self, q_lat, kv_lat_BSC, k_rope_BSR, cos_SR2, sin_SR2, norm_regions=None):
        """Eqs. 1-8 after the down-projections: latents -> q, k, v of shape [B, N, S, D].

        `q_lat` is c^Q before its norm (or the full query when q_lora_rank is None). With
        `norm_regions` a list, the latent norms are recomputed in backward (their regions are
        appended); with None they run plainly (inside the MLA up-projection region).
        """
        cfg = self.cfg
        B, S, _ = kv_lat_BSC.shape
        N, P, R, V = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        recompute_norm = norm_regions is not None and self.recompute_norm

        if cfg.q_lora_rank is None:
            q_BSND = q_lat
        else:
            q_lat_normed, region = maybe_recompute(recompute_norm, self.q_a_layernorm, q_lat)
            q_BSND = self.q_b_proj(q_lat_normed)
            if norm_regions is not None:
                norm_regions.append(region)
        q_BNSD = q_BSND.view(B, S, N, P + R).transpose(1, 2)
        q_nope_BNSP, q_rope_BNSR = q_BNSD.split([P, R], dim=-1)

        kv_lat_normed, region = maybe_recompute(recompute_norm, self.kv_a_layernorm, kv_lat_BSC)
        if norm_regions is not None:
            norm_regions.append(region)
        kv_BNS_PV = self.kv_b_proj(kv_lat_normed).view(B, S, N, P + V).transpose(1, 2)
        k_nope_BNSP, v_BNSV = kv_BNS_PV.split([P, V], dim=-1)

        interleave = cfg.rope_interleave
        q_rope_BNSR = apply_rotary(q_rope_BNSR, cos_SR2, sin_SR2, interleave)
        k_rope_B1SR = apply_rotary(k_rope_BSR.unsqueeze(1), cos_SR2, sin_SR2, interleave)
        q_BNSD = torch.cat([q_nope_BNSP, q_rope_BNSR], dim=-1)
        k_BNSD = torch.cat([k_nope_BNSP, k_rope_B1SR.expand(B, N, S, R)], dim=-1)
        return q_BNSD, k_BNSD, v_BNSV.contiguous()

    def _attend_over_slot(self, q_lat, kv_lat_BSC, k_rope_BSR, cos_SR2, sin_SR2, slot) -> torch.Tensor:
        """Eqs. 1-11 for these tokens' queries over the keys of a slot (moetron.models.common.kv_cache):
        generation's cache, or context parallelism's gather of every rank's tokens. What crosses is
        what DeepSeek's inference caches, the normalised latent c^KV [B, T, C] and the rotated k^R
        [B, 1, T, R] per token; keys and values are up-projected from them here. Where the slot says
        `recompute` (context parallelism), the up-projection and attention run again in backward
        rather than keep the whole row's keys and values (80 KiB per token at DeepSeek-V3, whatever
        the cp): what stays is the gathered latent, 1,152 bytes per token."""
        cfg = self.cfg
        B, S, _ = kv_lat_BSC.shape
        N, P, R, V = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q_BSND = q_lat if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(q_lat))
        q_nope_BNSP, q_rope_BNSR = q_BSND.view(B, S, N, P + R).transpose(1, 2).split([P, R], dim=-1)
        q_rope_BNSR = apply_rotary(q_rope_BNSR, cos_SR2, sin_SR2, cfg.rope_interleave)
        k_rope_B1SR = apply_rotary(k_rope_BSR.unsqueeze(1), cos_SR2, sin_SR2, cfg.rope_interleave)
        latent_BTC, k_rope_B1TR = slot.extend(self.kv_a_layernorm(kv_lat_BSC), k_rope_B1SR)
        q_BNSD = torch.cat([q_nope_BNSP, q_rope_BNSR], dim=-1)
        scale = q_BNSD.shape[-1] ** -0.5 * softmax_scale_factor(cfg.rope_scaling)

        def attend(q_BNSD, latent_BTC, k_rope_B1TR):
            T = latent_BTC.shape[1]
            kv_BNT_PV = self.kv_b_proj(latent_BTC).view(B, T, N, P + V).transpose(1, 2)
            k_nope_BNTP, v_BNTV = kv_BNT_PV.split([P, V], dim=-1)
            k_BNTD = torch.cat([k_nope_BNTP, k_rope_B1TR.expand(B, N, T, R)], dim=-1)
            return slot.state.attend(q_BNSD, k_BNTD, v_BNTV, scale)

        attn_BNSV, _ = maybe_recompute(slot.recompute, attend, q_BNSD, latent_BTC, k_rope_B1TR)
        return self.o_proj(attn_BNSV.transpose(1, 2).reshape(B, S, -1))

    def forward(self, x_BSH: torch.Tensor, cos_SR2: torch.Tensor, sin_SR2: torch.Tensor,
                samples: Optional[PackedSamples] = None) -> torch.Tensor:
        """`samples`: packed samples, each attending only to itself (else one causal sequence per row)."""
        cfg = self.cfg
        B, S, _ = x_BSH.shape
        q_lat = self.q_proj(x_BSH) if cfg.q_lora_rank is None else self.q_a_proj(x_BSH)
        kv_lat_BSC, k_rope_BSR = self.kv_a_proj_with_mqa(x_BSH).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        slot = key_slot(self, samples)
        if slot is not None:  # generation's cache or context parallelism's gather: keys beyond these tokens
            return self._attend_over_slot(q_lat, kv_lat_BSC, k_rope_BSR, cos_SR2, sin_SR2, slot)

        regions = []
        if self.recompute_mla_up_proj:
            up = lambda q, kv, kr: self._up_project(q, kv, kr, cos_SR2, sin_SR2)  # noqa: E731
            (q_BNSD, k_BNSD, v_BNSV), region = maybe_recompute(True, up, q_lat, kv_lat_BSC, k_rope_BSR)
            regions.append(region)
        else:
            q_BNSD, k_BNSD, v_BNSV = self._up_project(q_lat, kv_lat_BSC, k_rope_BSR, cos_SR2, sin_SR2, regions)

        # 1/sqrt(qk_nope + qk_rope), as eq. 10; under YaRN times mscale^2 (moetron.models.common.rope)
        scale = q_BNSD.shape[-1] ** -0.5 * softmax_scale_factor(cfg.rope_scaling)
        if samples is not None:
            attn_BNSV = packed_attention(q_BNSD, k_BNSD, v_BNSV, scale, samples)
        else:
            attn_BNSV = F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSV, is_causal=True, scale=scale)
        out_BSH = self.o_proj(attn_BNSV.transpose(1, 2).reshape(B, S, -1))
        discard_all(regions, after=out_BSH)
        return out_BSH
