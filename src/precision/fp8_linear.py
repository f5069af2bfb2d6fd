"""FP8 linear layers (DeepSeek-V3 report, section 3.3, figure 6): the forward, input-gradient and
weight-gradient GEMMs of a linear layer in E4M3 with fine-grained scales, FP32 accumulation.

- forward: y = x W^T, x in 1x128 tiles along K, W in 128x128 blocks; y in the compute dtype;
- input gradient: dx = dy W, dy in 1x128 tiles along N, W^T as W's blocks transposed;
- weight gradient: dW = dy^T x, dy^T and x^T in 1x128 tiles along the tokens (the backward
  re-quantizes the transposed activations); dW in float32 for the FP32 master weights.

`FP8Linear` replaces an nn.Linear (same parameters), `FP8GroupedGemm` the routed experts' grouped
GEMMs (one FP8 GEMM per expert). Both keep the `weight_grad_store` slot of pipeline W actions: with
the store enabled, the weight gradient is queued, not computed (moetron.core.weight_grads).
`cache_input`: the backward keeps the forward's FP8 tiles of the input (1 byte per element plus a
scale per 128) instead of the input itself, and the weight gradient re-quantizes their dequantized
values along the tokens (report section 3.3.3, "low-precision activation").

Shape legend: M tokens, K in features, N out features, E experts, S rows grouped by expert.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from moetron.precision.fp8_gemm import fp8_mm
from moetron.precision.quantize import Blocks, Tiles, quantize_blocks, quantize_tiles
from moetron.core.weight_grads import defer_or_compute


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def _weight_grad(grad_MN: torch.Tensor, x_MK: torch.Tensor, backend: str) -> torch.Tensor:
    """dW = dy^T x [N, K] in float32, both operands tiled along the tokens."""
    return fp8_mm(quantize_tiles(grad_MN.t()), quantize_tiles(x_MK.t()), torch.float32, backend)


def _save(ctx, x_MK: torch.Tensor, x_q: Tiles, cache_input: bool, w_q: list[Blocks]) -> None:
    """Keep for the backward x (itself, or with `cache_input` its FP8 tiles) and the FP8 weight
    blocks, all as saved tensors (what moetron.plan.memory counts)."""
    ctx.cached_cols = x_q.cols if cache_input else None
    ctx.w_cols = [w.cols for w in w_q]
    inputs = (x_q.data, x_q.scale) if cache_input else (x_MK,)
    ctx.save_for_backward(*inputs, *[t for w in w_q for t in (w.data, w.scale)])


def _tiles_kept(x: torch.Tensor, cache_input: bool) -> bool:
    """Whether the backward keeps x's FP8 tiles: with `cache_input`, unless a recompute region frees
    and refills x (moetron.parallel.recompute), whose reference costs nothing more."""
    return cache_input and not getattr(x, "recomputed_in_backward", False)


def _saved(ctx, dtype: torch.dtype) -> tuple[torch.Tensor, list[Blocks]]:
    """(x, the weight blocks) that `_save` kept."""
    saved = ctx.saved_tensors
    if ctx.cached_cols is None:
        x, rest = saved[0], saved[1:]
    else:
        x, rest = Tiles(saved[0], saved[1], ctx.cached_cols).dequantize().to(dtype), saved[2:]
    return x, [Blocks(rest[2 * i], rest[2 * i + 1], cols) for i, cols in enumerate(ctx.w_cols)]


class WeightBlocks:
    """A weight's 128x128 FP8 blocks, quantized once per step and shared by its micro-batches (TE
    caches its FP8 weights across micro-batches alike): a pipeline's forwards in flight keep one
    copy, not one each. Every optimizer step (any torch optimizer: a step pre-hook) forgets them
    before it changes the weights, which also frees them for the step's own peak: a fused optimizer
    changes weights without a new tensor version. The trainer's micro-batch runners also forget a
    model's blocks as a step or an evaluation starts (`forget_weight_blocks`: an average swapped
    in). Within a step, a new version of the weight (an in-place change) quantizes it again. Inside
    torch.compile the blocks are quantized each time (no state in the graph)."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[torch.Tensor, int, Blocks]] = {}  # id -> (the weight, its version, blocks)
        _LIVE_BLOCKS.add(self)

    def clear(self) -> None:
        self._held = {}

    def __call__(self, w: torch.Tensor) -> Blocks:
        if torch.compiler.is_compiling():
            return quantize_blocks(w.detach())
        held = self._held.get(id(w))
        if held is None or held[0] is not w or held[1] != w._version:
            held = (w, w._version, quantize_blocks(w.detach()))
            self._held[id(w)] = held
        return held[2]


_LIVE_BLOCKS: "weakref.WeakSet[WeightBlocks]" = weakref.WeakSet()


def _forget_all_blocks(optimizer, args, kwargs) -> None:
    for blocks in list(_LIVE_BLOCKS):
        blocks.clear()


register_optimizer_step_pre_hook(_forget_all_blocks)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, backend, store, out_dtype, cache_input, w_q=None):
        x_MK = x.reshape(-1, x.shape[-1])
        w_q, x_q = w_q if w_q is not None else quantize_blocks(weight.detach()), quantize_tiles(x_MK)
        y_MN = fp8_mm(x_q, w_q, out_dtype, backend)
        _save(ctx, x_MK, x_q, _tiles_kept(x, cache_input), [w_q])
        ctx.weight, ctx.backend, ctx.store, ctx.in_shape = weight, backend, store, x.shape
        ctx.in_dtype = x.dtype
        return y_MN.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x_MK, (w_q,) = _saved(ctx, ctx.in_dtype)
        grad_MN = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_mm(quantize_tiles(grad_MN), w_q.transposed(), grad_out.dtype, ctx.backend)
            grad_x = grad_x.view(ctx.in_shape).to(x_MK.dtype)
        grad_w = defer_or_compute(ctx.store, ctx.weight, lambda: _weight_grad(grad_MN, x_MK, ctx.backend))
        return grad_x, grad_w, None, None, None, None, None


class FP8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8 on `backend` ("emulated" or "torch"); a bias (GPT-OSS's
    attention has them) is added after the GEMM in the output's precision."""

    def __init__(self, in_features: int, out_features: int, backend: str = "emulated", cache_input: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.backend, self.cache_input = backend, cache_input
        self.weight_grad_store = None  # a pipeline's store, handed in by defer_weight_grads
        self.weight_blocks = WeightBlocks()  # the weight's FP8 blocks, shared by the micro-batches of a step

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str, cache_input: bool = False) -> "FP8Linear":
        """An FP8Linear holding `linear`'s own weight and bias (not copies)."""
        new = cls(linear.in_features, linear.out_features, backend, cache_input, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FP8LinearFn.apply(x, self.weight, self.backend, self.weight_grad_store, _compute_dtype(x),
                               self.cache_input, self.weight_blocks(self.weight))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}, cache_input={self.cache_input}"


class _FP8GroupedFn(torch.autograd.Function):
    """y[rows of e] = x[rows of e] W[e]^T in FP8, one GEMM per expert."""

    @staticmethod
    def forward(ctx, x_SK, w_ENK, counts, backend, store, out_dtype, pow2, cache_input, w_all):
        # w_all: every expert's blocks, quantized in one pass
        w_q = [Blocks(w_all.data[e], w_all.scale[e], w_all.cols) for e in range(len(counts))]
        x_q = quantize_tiles(x_SK, pow2)  # per-row tiles: the same as quantizing each expert's rows
        rows_q = [Tiles(d, s, x_q.cols) for d, s in zip(x_q.data.split(counts), x_q.scale.split(counts))]
        outs = [fp8_mm(r, w_q[e], out_dtype, backend) for e, r in enumerate(rows_q) if r.data.shape[0]]
        _save(ctx, x_SK, x_q, _tiles_kept(x_SK, cache_input), [w_all])
        ctx.w, ctx.counts, ctx.backend, ctx.store = w_ENK, counts, backend, store
        ctx.in_dtype = x_SK.dtype
        N = w_ENK.shape[1]
        return torch.cat(outs) if outs else x_SK.new_zeros(0, N, dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad_SN):
        x_SK, (w_all,) = _saved(ctx, ctx.in_dtype)
        w_q = [Blocks(w_all.data[e], w_all.scale[e], w_all.cols) for e in range(len(ctx.counts))]
        grads, xs = grad_SN.split(ctx.counts), x_SK.split(ctx.counts)
        grad_x = None
        if ctx.needs_input_grad[0]:
            parts = [fp8_mm(quantize_tiles(g), w_q[e].transposed(), grad_SN.dtype, ctx.backend)
                     for e, g in enumerate(grads) if g.shape[0]]
            grad_x = torch.cat(parts).to(x_SK.dtype) if parts else torch.zeros_like(x_SK)

        def weight_grad():
            w = ctx.w
            out = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            for e, (g, x) in enumerate(zip(grads, xs)):
                if g.shape[0]:  # an expert without rows has a zero gradient
                    out[e] = _weight_grad(g, x, ctx.backend)
            return out

        return grad_x, defer_or_compute(ctx.store, ctx.w, weight_grad), None, None, None, None, None, None, None


class FP8GroupedGemm:
    """The grouped expert GEMM in FP8, for layers with an `expert_gemm` slot (grouped experts):
    rows of x grouped by expert times each expert's w[e]^T -> [S, N]. `pow2`: the inputs' tile
    scales are powers of two, as FP8 dispatch's are, so that rows that arrived in FP8 are
    quantized again exactly (no second rounding); `cache_input`: see the module docstring."""

    def __init__(self, backend: str, pow2: bool = False, cache_input: bool = False) -> None:
        self.backend, self.pow2, self.cache_input = backend, pow2, cache_input
        self.weight_blocks = WeightBlocks()  # each weight stack's FP8 blocks, shared by a step's micro-batches

    def __call__(self, x_SK: torch.Tensor, w_ENK: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                 store=None) -> torch.Tensor:
        return _FP8GroupedFn.apply(x_SK, w_ENK, tokens_per_expert_E.tolist(), self.backend, store,
                                   _compute_dtype(x_SK), self.pow2, self.cache_input, self.weight_blocks(w_ENK))

    def __repr__(self) -> str:
        return f"FP8GroupedGemm(backend={self.backend}, pow2={self.pow2}, cache_input={self.cache_input})"


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "emulated",
               store: Optional[object] = None, cache_input: bool = False) -> torch.Tensor:
    """x W^T in FP8 (functional form of FP8Linear)."""
    return _FP8LinearFn.apply(x, weight, backend, store, _compute_dtype(x), cache_input)



def forget_weight_blocks(modules) -> None:
    """Drop the FP8 weight blocks held by `modules` and everything inside them (see WeightBlocks)."""
    for root in modules:
        for m in root.modules():
            for holder in (m, getattr(m, "expert_gemm", None)):
                blocks = getattr(holder, "weight_blocks", None)
                if isinstance(blocks, WeightBlocks):
                    blocks.clear()
