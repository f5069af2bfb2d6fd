"""RMSNorm (Zhang & Sennrich 2019), computed in float32 as one autograd node.

Shape legend: any leading dims, then the normalised dim.
"""
from __future__ import annotations

import torch
from torch import nn


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
