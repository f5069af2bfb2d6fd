"""SwiGLU whose inputs are cached in FP8 for the backward, its output recomputed there (DeepSeek-V3
report, section 3.3.3: "inputs of the SwiGLU operator in MoE": the experts' gate and up
projections, in 1x128 tiles). The forward's output is exact; the backward's gradients are those of
the dequantized inputs.

    y = SiLU(g) u,  dy/dg = s (1 + g (1 - s)) u with s = sigmoid(g),  dy/du = SiLU(g)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moetron.precision.quantize import Tiles, quantize_tiles


def _quantize_rows(x: torch.Tensor) -> Tiles:
    return quantize_tiles(x.reshape(-1, x.shape[-1]))


class _FP8CachedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g_q, u_q = _quantize_rows(gate), _quantize_rows(up)
        ctx.save_for_backward(g_q.data, g_q.scale, u_q.data, u_q.scale)
        ctx.shape, ctx.cols, ctx.dtypes = gate.shape, gate.shape[-1], (gate.dtype, up.dtype)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_y):
        g_data, g_scale, u_data, u_scale = ctx.saved_tensors
        g = Tiles(g_data, g_scale, ctx.cols).dequantize().view(ctx.shape)
        u = Tiles(u_data, u_scale, ctx.cols).dequantize().view(ctx.shape)
        s = torch.sigmoid(g)
        grad = grad_y.float()
        grad_g = grad * u * s * (1 + g * (1 - s))
        grad_u = grad * g * s
        return grad_g.to(ctx.dtypes[0]), grad_u.to(ctx.dtypes[1])


def fp8_cached_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, keeping only FP8 tiles of gate and up for the backward."""
    return _FP8CachedSwiGLU.apply(gate, up)


class FP8Inputs:
    """How a recompute region keeps the SwiGLU inputs when activations are cached in FP8 too (report
    sections 3.2.3 and 3.3.3 together): as 1x128 E4M3 tiles, dequantized to recompute the output in
    the backward (moetron.parallel.recompute.OutputRecompute's `keep`). Inputs of fewer than two
    dimensions (routing weights) are kept as they are."""

    def pack(self, inputs):
        kept, meta = [], []
        for t in inputs:
            if t.dim() < 2 or not t.is_floating_point():
                kept.append(t)
                meta.append(None)
            else:
                q = _quantize_rows(t)
                kept += [q.data, q.scale]
                meta.append((t.shape, t.dtype, q.cols))
        return tuple(kept), meta

    def unpack(self, kept, meta):
        inputs, i = [], 0
        for m in meta:
            if m is None:
                inputs.append(kept[i])
                i += 1
            else:
                shape, dtype, cols = m
                inputs.append(Tiles(kept[i], kept[i + 1], cols).dequantize().to(dtype).view(shape))
                i += 2
        return tuple(inputs)


FP8_INPUTS = FP8Inputs()
