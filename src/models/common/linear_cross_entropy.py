"""The output head and its cross entropy in one function, a chunk of tokens at a time, so that no
[tokens, vocab] logits are kept for the backward (memory.chunked_loss; issue 26).

    loss = mean over counted positions t of  logsumexp_v(h_t . w_v) - h_t . w_{y_t}

The forward keeps the head's input, the labels and each position's float32 log-sum-exp; the
backward computes each chunk's logits again (one more head GEMM, 2 x V x H FLOPs per token), turns
them into the softmax gradient p - onehot(y), and multiplies it into the input's and the weight's
gradients. The logits are computed in the autocast dtype where autocast is on (as F.linear would)
and reduced in float32 (as `cross_entropy` does); the weight's gradient accumulates in float32.

Shape legend: T tokens, H hidden, V vocabulary, C tokens of a chunk.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024  # a chunk's float32 logits: 1024 x 129,280 x 4 B = 0.5 GiB at DeepSeek-V3's vocabulary


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    device_type = t.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TH, w_VH, labels_T, chunk: int, denominator: Optional[float]):
        dtype = _compute_dtype(h_TH)
        w_cast = w_VH.to(dtype)  # once per call, not kept
        counted_T = labels_T != IGNORE_INDEX
        lse_T = torch.empty(h_TH.shape[0], dtype=torch.float32, device=h_TH.device)
        total = torch.zeros((), dtype=torch.float32, device=h_TH.device)
        for start in range(0, h_TH.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits_CV = (h_TH[rows].to(dtype) @ w_cast.t()).float()
            lse_T[rows] = torch.logsumexp(logits_CV, dim=-1)
            target_C = logits_CV.gather(1, labels_T[rows].clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(counted_T[rows], lse_T[rows] - target_C, 0.0).sum()
        count = counted_T.sum() if denominator is None else torch.tensor(float(denominator), device=h_TH.device)
        ctx.save_for_backward(h_TH, w_VH, labels_T, lse_T, count)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total / count  # NaN when nothing counts, as F.cross_entropy's mean

    @staticmethod
    def backward(ctx, grad):
        h_TH, w_VH, labels_T, lse_T, count = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        w_cast = w_VH.to(dtype)
        scale_T = torch.where(labels_T != IGNORE_INDEX, grad.float() / count, 0.0)
        grad_h_TH = torch.empty_like(h_TH) if ctx.needs_input_grad[0] else None
        grad_w_VH = torch.zeros(w_VH.shape, dtype=torch.float32, device=w_VH.device) if ctx.needs_input_grad[1] else None
        for start in range(0, h_TH.shape[0], chunk):
            rows = slice(start, start + chunk)
            h_CH = h_TH[rows].to(dtype)
            probs_CV = torch.exp((h_CH @ w_cast.t()).float() - lse_T[rows].unsqueeze(1))
            probs_CV.scatter_add_(1, labels_T[rows].clamp(min=0).unsqueeze(1), -torch.ones_like(lse_T[rows]).unsqueeze(1))
            dlogits_CV = (probs_CV * scale_T[rows].unsqueeze(1)).to(dtype)
            if grad_h_TH is not None:
                grad_h_TH[rows] = (dlogits_CV @ w_cast).to(h_TH.dtype)
            if grad_w_VH is not None:
                grad_w_VH += (dlogits_CV.t() @ h_CH).float()
        return grad_h_TH, None if grad_w_VH is None else grad_w_VH.to(w_VH.dtype), None, None, None


def linear_cross_entropy(h_BSH: torch.Tensor, weight_VH: torch.Tensor, labels_BS: torch.Tensor,
                         chunk: int = CHUNK_TOKENS, denominator: Optional[float] = None) -> torch.Tensor:
    """Mean cross entropy of the logits h W^T against `labels_BS` (IGNORE_INDEX positions do not
    count), without keeping the logits (see the module docstring); with `denominator`, their sum
    divided by it instead of by their count."""
    return _LinearCrossEntropy.apply(h_BSH.flatten(0, 1), weight_VH, labels_BS.flatten(), chunk, denominator)


class OutputHead(nn.Linear):
    """The output head: logits as nn.Linear gives them, or with `labels` the chunked cross entropy
    of them (`linear_cross_entropy`). The loss is computed by calling the module, so that its
    forward hooks run as for the logits (ZeRO-1's overlapped gather lands the head's weight in one)."""

    def forward(self, h_BSH: torch.Tensor, labels_BS: torch.Tensor | None = None,
                denominator: Optional[float] = None) -> torch.Tensor:
        if labels_BS is None:
            return super().forward(h_BSH)
        return linear_cross_entropy(h_BSH, self.weight, labels_BS, denominator=denominator)
