"""Routed experts as grouped 3-D weights, computed with one grouped GEMM per projection.

`torch._grouped_mm` multiplies each contiguous group of rows by its own matrix. It needs 16-byte
aligned strides; where the build lacks it or the shapes do not align, a per-expert loop computes the
same thing (the tests hold the two against each other).

Shape legend: S rows (token copies, grouped by expert), H hidden, I expert FFN width, E experts,
K_in / N_out the inner / outer dims of one grouped GEMM.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moetron.comm.dispatch.rows import scale_rows
from moetron.models.common.mlp import swiglu
from moetron.parallel.recompute import discard_all, maybe_recompute
from moetron.core.weight_grads import defer_or_compute

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _aligned(t: torch.Tensor) -> bool:
    row_bytes = t.shape[-1] * t.element_size()
    return t.is_contiguous() and row_bytes % 16 == 0 and t.storage_offset() * t.element_size() % 16 == 0


class _GroupedMM(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e]^T, with both gradients as grouped GEMMs.

    With a pipeline's weight-gradient store enabled (a B action), the weight gradient is queued for
    the later W action instead of computed now, and added to `w_param` (the parameter `w` is, or was
    cast from under autocast) in its dtype (moetron.core.weight_grads).
    """

    @staticmethod
    def forward(ctx, x_SK, w_ENK, offsets_E, store, w_param):
        ctx.save_for_backward(x_SK, w_ENK, offsets_E)
        ctx.store, ctx.w_param = store, w_param
        return torch._grouped_mm(x_SK, w_ENK.transpose(-2, -1), offs=offsets_E)

    @staticmethod
    def backward(ctx, grad_SN):
        x_SK, w_ENK, offsets_E = ctx.saved_tensors
        grad_SN = grad_SN.contiguous()
        grad_x_SK = torch._grouped_mm(grad_SN, w_ENK, offs=offsets_E)

        # groups along S: grad_rows^T @ x_rows per expert (zero for no rows); deferred, no gradient
        # flows back now, through the cast or otherwise
        grad_w = defer_or_compute(ctx.store, ctx.w_param, lambda: torch._grouped_mm(grad_SN.t(), x_SK, offs=offsets_E))
        return grad_x_SK, grad_w, None, None, None


class _LoopMM(torch.autograd.Function):
    """The same product as _GroupedMM, one matmul per expert (where grouped_mm cannot run); the
    weight gradient deferred alike. Its products are the ones autograd runs for the loop."""

    @staticmethod
    def forward(ctx, x_SK, w_ENK, sizes, store, w_param):
        ctx.save_for_backward(x_SK, w_ENK)
        ctx.sizes, ctx.store, ctx.w_param = sizes, store, w_param
        outs = [chunk @ w_ENK[e].transpose(0, 1) for e, chunk in enumerate(x_SK.split(sizes))]
        return torch.cat(outs) if outs else x_SK.new_zeros(0, w_ENK.shape[1])

    @staticmethod
    def backward(ctx, grad_SN):
        x_SK, w_ENK = ctx.saved_tensors
        grads, xs = grad_SN.split(ctx.sizes), x_SK.split(ctx.sizes)
        grad_x_SK = torch.cat([g @ w_ENK[e] for e, g in enumerate(grads)]) if ctx.needs_input_grad[0] else None
        grad_w = defer_or_compute(ctx.store, ctx.w_param,
                                  lambda: torch.stack([g.t() @ x for g, x in zip(grads, xs)]))
        return grad_x_SK, grad_w, None, None, None


def grouped_mm_loop(x_SK: torch.Tensor, w_ENK: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                    weight_grad_store=None, w_param=None) -> torch.Tensor:
    """The reference path: one matmul per expert."""
    return _LoopMM.apply(x_SK, w_ENK, tokens_per_expert_E.tolist(), weight_grad_store, w_param)


def grouped_mm(x_SK: torch.Tensor, w_ENK: torch.Tensor, tokens_per_expert_E: torch.Tensor,
               use_grouped_mm: bool = True, weight_grad_store=None) -> torch.Tensor:
    """Rows of x grouped by expert (sizes `tokens_per_expert_E`) times each expert's w[e]^T -> [S, N].

    Under autocast both operands are cast to the autocast dtype, as autocast does for F.linear.
    """
    device_type = x_SK.device.type
    w_param = w_ENK if isinstance(w_ENK, torch.nn.Parameter) else None
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x_SK, w_ENK = x_SK.to(dtype), w_ENK.to(dtype)
    if use_grouped_mm and HAS_GROUPED_MM and _aligned(x_SK) and _aligned(w_ENK) and w_ENK.shape[1] * w_ENK.element_size() % 16 == 0:
        offsets_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
        if x_SK.dtype != torch.bfloat16:
            # torch.compile traces grouped_mm for BF16 only (its CUDA kernel's dtype); in float32 (the
            # CPU) the GEMM stays eager, a graph break inside a compiled block
            return _grouped_mm_eager(x_SK, w_ENK, offsets_E, weight_grad_store, w_param)
        return _GroupedMM.apply(x_SK, w_ENK, offsets_E, weight_grad_store, w_param)
    return _loop_eager(x_SK, w_ENK, tokens_per_expert_E, weight_grad_store, w_param)


@torch.compiler.disable
def _grouped_mm_eager(x_SK, w_ENK, offsets_E, store, w_param):
    return _GroupedMM.apply(x_SK, w_ENK, offsets_E, store, w_param)


@torch.compiler.disable  # per-expert sizes on the host: eager, not a recompile per step's counts
def _loop_eager(x_SK, w_ENK, tokens_per_expert_E, store, w_param):
    return grouped_mm_loop(x_SK, w_ENK, tokens_per_expert_E, store, w_param)


class GroupedExperts(nn.Module):
    """E SwiGLU experts: `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I],
    the layout of transformers' DeepseekV3Experts; with `bias`, `gate_up_proj_bias` [E, 2I] and
    `down_proj_bias` [E, H] (GPT-OSS). `activation(gate, up)` is SwiGLU unless a family hands in
    another (GPT-OSS's clamped one)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bias: bool = False,
                 activation=swiglu) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None
        self.recompute_swiglu = False  # a slot the recompute converter sets
        self.use_grouped_mm = True
        self.weight_grad_store = None  # handed in by parallelize's converter, to defer weight gradients to W
        self.first_expert = 0  # global index of expert 0 here (expert parallelism shards the stack)
        self.global_experts = num_experts  # experts in the whole stack, whatever this rank holds
        # a grouped GEMM of another precision (FP8: moetron.precision.convert hands one in), called
        # as expert_gemm(x_SK, w_ENK, tokens_per_expert_E, weight_grad_store); None: grouped_mm
        self.expert_gemm = None
        self.activation = activation  # a converter may hand in another (FP8: inputs cached in FP8)
        self.recompute_inputs = None  # how a recompute region keeps the inputs (FP8: as tiles); None: as they are

    def _gemm(self, x_SK: torch.Tensor, w_ENK: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        if self.expert_gemm is not None:
            return self.expert_gemm(x_SK, w_ENK, tokens_per_expert_E, self.weight_grad_store)
        return grouped_mm(x_SK, w_ENK, tokens_per_expert_E, self.use_grouped_mm, self.weight_grad_store)

    def forward(self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                gate_S: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Each row through its expert. With `gate_S` (each row's routing weight), the SwiGLU output is
        scaled by it before the down-projection, which is linear, so the output is the gated one
        (eq. 13's g_{i,t} FFN_i(u_t)) and the combine keeps no expert outputs for its backward; the
        gate's gradient then comes from the (recomputed) SwiGLU output."""
        gate_up_S2I = _add_row_bias(self._gemm(x_SH.contiguous(), self.gate_up_proj, tokens_per_expert_E),
                                    self.gate_up_proj_bias, tokens_per_expert_E)
        gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
        keep = self.recompute_inputs
        if gate_S is None:
            act_SI, region = maybe_recompute(self.recompute_swiglu, self.activation, gate_SI, up_SI, keep=keep)
        else:
            act_SI, region = maybe_recompute(self.recompute_swiglu, self._gated_activation, gate_SI, up_SI, gate_S,
                                             keep=keep)
        y_SH = _add_row_bias(self._gemm(act_SI, self.down_proj, tokens_per_expert_E), self.down_proj_bias,
                             tokens_per_expert_E, gate_S)
        discard_all([region], after=y_SH)
        return y_SH

    def _gated_activation(self, gate_SI: torch.Tensor, up_SI: torch.Tensor, gate_S: torch.Tensor) -> torch.Tensor:
        return scale_rows(self.activation(gate_SI, up_SI), gate_S)


def _add_row_bias(y_SN: torch.Tensor, bias_EN, tokens_per_expert_E: torch.Tensor,
                  gate_S: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y plus each row's expert's bias (rows grouped by expert, `tokens_per_expert_E` of each), scaled
    by the row's gate where one is given (the rows were)."""
    if bias_EN is None:
        return y_SN
    if gate_S is not None:
        return _GatedRowBias.apply(y_SN, bias_EN, tokens_per_expert_E, gate_S)
    rows_bias_SN = bias_EN.repeat_interleave(tokens_per_expert_E, dim=0, output_size=y_SN.shape[0])
    return y_SN + rows_bias_SN.to(y_SN.dtype)


class _GatedRowBias(torch.autograd.Function):
    """y + gate_S[s] * bias_EN[expert of row s], keeping the counts and gates, not the [S, N] rows of
    bias (rebuilt in the backward), computed in float32 as `scale_rows` does."""

    @staticmethod
    def forward(ctx, y_SN, bias_EN, tokens_per_expert_E, gate_S):
        ctx.save_for_backward(bias_EN, tokens_per_expert_E, gate_S)
        rows_SN = bias_EN.repeat_interleave(tokens_per_expert_E, dim=0, output_size=y_SN.shape[0])
        return y_SN + (rows_SN.float() * gate_S.float().unsqueeze(-1)).to(y_SN.dtype)

    @staticmethod
    def backward(ctx, grad_SN):
        bias_EN, tokens_per_expert_E, gate_S = ctx.saved_tensors
        S = grad_SN.shape[0]
        rows_SN = bias_EN.repeat_interleave(tokens_per_expert_E, dim=0, output_size=S).float()
        grad = grad_SN.float()
        grad_gate_S = (grad * rows_SN).sum(-1).to(gate_S.dtype)
        expert_S = torch.arange(len(tokens_per_expert_E), device=grad.device).repeat_interleave(
            tokens_per_expert_E, output_size=S)
        grad_bias_EN = torch.zeros(bias_EN.shape, dtype=torch.float32, device=grad.device).index_add_(
            0, expert_S, grad * gate_S.float().unsqueeze(-1)).to(bias_EN.dtype)
        return grad_SN, grad_bias_EN, None, grad_gate_S
