"""Building blocks shared by attention, experts and MTP: RMSNorm, rotary embedding, SwiGLU MLP.

Shape legend: B batch, S sequence, H hidden, R rotary dim (qk_rope_head_dim), I FFN width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetron.models.deepseek_v3.rope import inv_freq
from moetron.parallel.recompute import discard_all, maybe_recompute


FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")  # torch 2.9+: (normalised, rstd)


class _RMSNormFunction(torch.autograd.Function):
    """y = w * (x / sqrt(mean(x^2) + eps)), normalised in float32, as one autograd node.

    One node (rather than torch's composite of pow, mean, rsqrt, mul) gives x a single gradient
    term, so a recomputed norm sums the input's gradients in the same order as a stored one. The
    normalisation is torch's fused RMSNorm kernel where the build has it (bitwise the composite's
    result on the CPU; tests/unit/test_model.py holds it), which also returns rstd for the backward.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        x_f = x.to(torch.promote_types(x.dtype, torch.float32))
        if FUSED_RMS_NORM:
            normed_f, rstd = torch.ops.aten._fused_rms_norm(x_f, [x_f.shape[-1]], None, eps)
        else:
            rstd = torch.rsqrt(x_f.pow(2).mean(dim=-1, keepdim=True) + eps)
            normed_f = x_f * rstd
        normed = normed_f.to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        normed_f = x.to(rstd.dtype) * rstd
        grad_w = (grad_y * normed_f.to(x.dtype)).flatten(0, -2).sum(dim=0) if ctx.needs_input_grad[1] else None
        grad_normed_f = (grad_y * weight).to(rstd.dtype)
        # d/dx of x * rstd: rstd * (g - normed * mean(g * normed))
        grad_x_f = rstd * (grad_normed_f - normed_f * (grad_normed_f * normed_f).mean(dim=-1, keepdim=True))
        return grad_x_f.to(x.dtype), grad_w, None


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, then scaled (as DeepSeek and transformers do)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def rotary_cos_sin(seq_len: int, rope_dim: int, theta: float, device, dtype,
                   scaling: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [S, R/2] for positions 0..S-1 (RoPE, Su et al. 2021; with `scaling`,
    YaRN: moetron.models.deepseek_v3.rope)."""
    inv_freq_R2, attention = inv_freq(rope_dim, theta, scaling, device)
    positions_S = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles_SR2 = positions_S[:, None] * inv_freq_R2[None, :]
    return (angles_SR2.cos() * attention).to(dtype), (angles_SR2.sin() * attention).to(dtype)


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


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up (Shazeer 2020)."""
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers' FFN and the shared experts (their widths summed)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.recompute_swiglu = False  # a slot the recompute converter sets
        self.activation = swiglu  # a converter may hand in another (FP8: inputs cached in FP8)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        act_BSI, region = maybe_recompute(self.recompute_swiglu, self.activation, self.gate_proj(x_BSH),
                                          self.up_proj(x_BSH))
        out_BSH = self.down_proj(act_BSI)
        discard_all([region], after=out_BSH)
        return out_BSH
