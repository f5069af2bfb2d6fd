"""FP8 dispatch (DeepSeek-V3 report, section 3.3.3): token rows go to their experts as E4M3 with one
power-of-two scale per 1x128 tile, and are dequantized on arrival; so does the activation gradient
before the experts' down-projection, which the combine's backward sends to the experts. The
combine's forward (the experts' outputs) and the dispatch's backward (the gradients of the
dispatched rows) stay in the compute dtype. Power-of-two scales make a second hop (node-aware
dispatch forwards what it received) re-quantize exactly. Without expert parallelism nothing travels,
but the local dispatcher rounds the rows and the gradients the same way (`round_trip`,
`round_trip_grad`), so that every layout computes the same model.

A codec for moetron.comm.dispatch (the `codec` of the EP dispatchers); FP8 travels as bytes, since
gloo has no float8 collectives.
"""
from __future__ import annotations

import math

import torch

from moetron.comm.a2a import all_to_all, all_to_all_packed
from moetron.precision.quantize import E4M3, TILE, Tiles, quantize_tiles


def _rounded(x_NH: torch.Tensor) -> torch.Tensor:
    return quantize_tiles(x_NH, pow2=True).dequantize().to(x_NH.dtype)


class _FP8RoundTrip(torch.autograd.Function):
    """Rows rounded as FP8 dispatch rounds them; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, x_NH):
        return _rounded(x_NH)

    @staticmethod
    def backward(ctx, grad_NH):
        return grad_NH


class _FP8GradRoundTrip(torch.autograd.Function):
    """Rows as they are; their gradient rounded as the combine's FP8 backward rounds it."""

    @staticmethod
    def forward(ctx, y_NH):
        return y_NH.view_as(y_NH)

    @staticmethod
    def backward(ctx, grad_NH):
        return _rounded(grad_NH)


def _send_tiles(x_NH: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """x's rows to the peers as E4M3 tiles and float32 scales (as bytes), dequantized on arrival."""
    q = quantize_tiles(x_NH, pow2=True)
    data_MB, scale_MT = all_to_all_packed([q.data.view(torch.uint8), q.scale], send, recv, group)
    return Tiles(data_MB.view(E4M3), scale_MT, x_NH.shape[-1]).dequantize().to(x_NH.dtype)


class _FP8Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NH, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _send_tiles(x_NH, send, recv, group)

    @staticmethod
    def backward(ctx, grad_MH):
        return all_to_all(grad_MH.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


class _FP8GradExchange(torch.autograd.Function):
    """The combine direction: rows sent as they are, their gradient sent back as E4M3 tiles."""

    @staticmethod
    def forward(ctx, y_MH, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return all_to_all(y_MH, send, recv, group)

    @staticmethod
    def backward(ctx, grad_NH):
        return _send_tiles(grad_NH.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


class FP8DispatchCodec:
    """Rows as E4M3 tiles (1 byte per element, H padded to 128s) plus a float32 scale per tile."""

    def exchange(self, x_NH: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        return _FP8Exchange.apply(x_NH, send, recv, group)

    def round_trip(self, x_NH: torch.Tensor) -> torch.Tensor:
        """What a peer receives, without sending (EP = 1 rounds its rows the same way)."""
        return _FP8RoundTrip.apply(x_NH)

    def send_back(self, y_MH: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        """The combine's exchange: outputs as they are, their gradients back as E4M3 tiles."""
        return _FP8GradExchange.apply(y_MH, send, recv, group)

    def round_trip_grad(self, y_NH: torch.Tensor) -> torch.Tensor:
        """y as it is, its gradient as the experts receive it under EP (EP = 1 rounds it alike)."""
        return _FP8GradRoundTrip.apply(y_NH)

    def bytes_per_row(self, x_NH: torch.Tensor) -> int:
        tiles = math.ceil(x_NH.shape[-1] / TILE)
        return tiles * TILE + tiles * 4
