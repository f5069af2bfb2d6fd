"""The row arithmetic of combine, keeping for the backward only what it needs.

`sum_rows` adds rows into their destinations (y_MH[idx[s]] += y_SH[s]) and keeps the index alone:
torch's `index_add` keeps its whole source for the backward. `scale_rows` multiplies each row by its
gate in float32 and keeps the rows in their own dtype and the gates (a float32 product would keep a
float32 copy of the rows).

Shape legend: S rows, M destination rows, H width.
"""
from __future__ import annotations

import torch


class _SumRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_SH, index_S, num_rows: int):
        ctx.save_for_backward(index_S)
        return y_SH.new_zeros(num_rows, y_SH.shape[-1]).index_add_(0, index_S, y_SH)

    @staticmethod
    def backward(ctx, grad_MH):
        (index_S,) = ctx.saved_tensors
        return grad_MH.index_select(0, index_S), None, None


def sum_rows(y_SH: torch.Tensor, index_S: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows, H]: row m is the sum of the rows s with index_S[s] == m."""
    return _SumRows.apply(y_SH, index_S, num_rows)


class _ScaleRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SN, weight_S):
        ctx.save_for_backward(x_SN, weight_S)
        return (x_SN.float() * weight_S.float().unsqueeze(-1)).to(x_SN.dtype)

    @staticmethod
    def backward(ctx, grad_SN):
        x_SN, weight_S = ctx.saved_tensors
        grad = grad_SN.float()
        grad_x = (grad * weight_S.float().unsqueeze(-1)).to(x_SN.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad * x_SN.float()).sum(-1).to(weight_S.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def scale_rows(x_SN: torch.Tensor, weight_S: torch.Tensor) -> torch.Tensor:
    """x_SN[s] * weight_S[s], computed in float32, in x's dtype."""
    return _ScaleRows.apply(x_SN, weight_S)
