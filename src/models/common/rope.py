"""Rotary position embedding: plain RoPE (Su et al. 2021) and YaRN (Peng et al. 2023), DeepSeek-V3's context
extension from 4K to 128K (report section 4.3; the configuration of DeepSeek-V2: s = 40, alpha = 1,
beta = 32, sqrt(t) = 0.1 ln s + 1).

YaRN interpolates the slow frequencies by 1/factor, keeps the fast ones, and blends between the
dimensions that turn beta_fast and beta_slow times over the original context; cos/sin are scaled by
mscale(factor, mscale) / mscale(factor, mscale_all_dim), and MLA's softmax scale by
mscale(factor, mscale_all_dim)^2, as transformers' DeepseekV3 does.

Shape legend: S sequence, R rotary dim, R2 rotary pairs (R / 2).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

YARN_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"}


def get_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_problems(scaling: Optional[dict[str, Any]]) -> list[str]:
    if scaling is None:
        return []
    if not isinstance(scaling, dict):
        return [f"model.rope_scaling={scaling!r}: a mapping, e.g. model.rope_scaling={{type:yarn,factor:4,"
                "original_max_position_embeddings:4096}, or null"]
    kind = scaling.get("type", scaling.get("rope_type"))
    problems = []
    if kind != "yarn":
        problems.append(f"model.rope_scaling type={kind!r}: moetron implements yarn (or None: plain RoPE)")
    unknown = sorted(set(scaling) - YARN_KEYS)
    if unknown:
        problems.append(f"model.rope_scaling has unknown keys {unknown}; it takes {sorted(YARN_KEYS)}")
    if not scaling.get("factor") or scaling["factor"] < 1 or not scaling.get("original_max_position_embeddings"):
        problems.append("model.rope_scaling needs factor >= 1 and original_max_position_embeddings")
    return problems


def inv_freq(rope_dim: int, theta: float, scaling: Optional[dict[str, Any]], device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [R2] in float32, the factor cos and sin are scaled by)."""
    base_R2 = theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim)
    if scaling is None:
        return 1.0 / base_R2, 1.0
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def dim_turning(turns: float) -> float:  # the dimension whose frequency turns `turns` times over `original`
        return rope_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rope_dim - 1)
    if low == high:
        high += 0.001
    ramp_R2 = ((torch.arange(rope_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep_R2 = 1 - ramp_R2  # 1: extrapolate (fast, kept); 0: interpolate (slow, divided by factor)
    freq_R2 = (1.0 / (factor * base_R2)) * (1 - keep_R2) + (1.0 / base_R2) * keep_R2
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        attention = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    else:
        attention = get_mscale(factor)
    return freq_R2, float(attention)


def softmax_scale_factor(scaling: Optional[dict[str, Any]]) -> float:
    """What MLA multiplies its 1/sqrt(d) softmax scale by: mscale(factor, mscale_all_dim)^2 under YaRN."""
    if scaling is None or not scaling.get("mscale_all_dim"):
        return 1.0
    return get_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2


def rotary_cos_sin(seq_len: int, rope_dim: int, theta: float, device, dtype,
                   scaling: Optional[dict] = None, position_ids_BS: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [S, R/2] for positions 0..S-1 (RoPE, Su et al. 2021; with `scaling`,
    YaRN: `inv_freq` above); with `position_ids_BS` (packed samples), of shape [B, 1, S, R/2] for
    those positions (a sample at positions 0..L-1 gets the same values as alone)."""
    inv_freq_R2, attention = inv_freq(rope_dim, theta, scaling, device)
    if position_ids_BS is None:
        positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    else:
        positions = position_ids_BS.to(device=device, dtype=torch.float32).unsqueeze(1)  # [B, 1, S]
    angles = positions[..., None] * inv_freq_R2
    return (angles.cos() * attention).to(dtype), (angles.sin() * attention).to(dtype)


def apply_rotary(x_R: torch.Tensor, cos_SR2: torch.Tensor, sin_SR2: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x [..., S, R] by position.

    `interleave=True` is DeepSeek's layout: pairs (x0, x1), (x2, x3), ... rotate together. The result
    is written with all first elements, then all second elements (as transformers does); query and
    key get the same permutation, so their dot products are those of the interleaved form.
    `interleave=False` pairs x[j] with x[j + R/2] (the Llama layout).
    """
    if interleave:
        first, second = x_R[..., 0::2], x_R[..., 1::2]
    else:
        half = x_R.shape[-1] // 2
        first, second = x_R[..., :half], x_R[..., half:]
    return torch.cat([first * cos_SR2 - second * sin_SR2, second * cos_SR2 + first * sin_SR2], dim=-1)
