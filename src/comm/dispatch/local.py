"""EP = 1: every expert is local, so dispatch is a permutation of token copies (see the package
docstring for the contract).

Shape legend: T tokens, H hidden, K experts per token, S received rows, E local experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moetron.comm.counts import count_per_expert
from moetron.comm.dispatch.rows import scale_rows, sum_rows


@dataclass
class LocalDispatchHandle:
    token_idx_S: torch.Tensor  # source token of each received row
    weight_S: torch.Tensor  # its gate
    num_tokens: int


class LocalDispatcher:
    """EP = 1: all experts are local, so dispatch is a permutation of token copies."""

    def __init__(self, num_experts: int, codec=None) -> None:
        """`codec`: rows reach the experts, and gradients the experts' outputs, as that codec
        delivers them (`codec.round_trip`, `codec.round_trip_grad`), as they would under expert
        parallelism (FP8 dispatch rounds both); None: as they are."""
        self.num_experts = num_experts
        self.codec = codec

    def dispatch(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor):
        if self.codec is not None:
            x_TH = self.codec.round_trip(x_TH)
        K = topk_idx_TK.shape[1]
        expert_of_row = topk_idx_TK.reshape(-1)
        order_S = torch.argsort(expert_of_row, stable=True)
        token_idx_S = order_S // K
        tokens_per_expert_E = count_per_expert(expert_of_row, self.num_experts)
        x_recv_SH = x_TH.index_select(0, token_idx_S)
        weight_S = topk_weight_TK.reshape(-1).index_select(0, order_S)
        return x_recv_SH, tokens_per_expert_E, LocalDispatchHandle(token_idx_S, weight_S, x_TH.shape[0])

    def combine(self, y_SH: torch.Tensor, handle: LocalDispatchHandle, weighted: bool = True) -> torch.Tensor:
        """Each token's rows summed, weighted by their gates first (in float32) unless `weighted` is
        False (the experts applied the gates already)."""
        rows_SH = scale_rows(y_SH, handle.weight_S) if weighted else y_SH
        y_TH = sum_rows(rows_SH, handle.token_idx_S, handle.num_tokens)
        return self.codec.round_trip_grad(y_TH) if self.codec is not None else y_TH
