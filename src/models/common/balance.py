"""Load balancing of routed experts: balance losses and MaxVio (the bias update: `moe_step`).

- Complementary sequence-wise loss (report eqs. 17-20): per sequence, f_i = E / (K S) * (tokens
  choosing i) and P_i = mean over the sequence of s'_{i,t} = s_{i,t} / sum_j s_{j,t};
  L = alpha * sum_i f_i P_i, averaged over sequences.
- Classic auxiliary loss: the same over all tokens of the micro-batch (the baseline of
  Loss-Free Balancing, arXiv 2408.15664, alpha 1e-3).
- Global-batch loss (Qiu et al. 2025, arXiv 2501.11873): the classic loss with f_i counted over
  the micro-batch of every data-parallel rank (their counts summed before it is applied) and P_i
  over this rank's tokens; the data-parallel mean of the ranks' losses is then the loss of their
  union, each rank's gradient its share.
- Router z-loss (ST-MoE, arXiv 2202.08906 eq. 5): mean over tokens of logsumexp(logits)^2.
- MaxVio_batch = (max_i load_i - mean load) / mean load.

Shape legend: B batch, S sequence, T tokens, E routed experts, K experts per token, L MoE layers.
"""
from __future__ import annotations

from typing import Optional

import torch

from moetron.comm.sequence import sum_for_mean, sum_over


def sequence_balance_loss(scores_BSE: torch.Tensor, topk_idx_BSK: torch.Tensor,
                          counted_BS: Optional[torch.Tensor] = None, context_group=None) -> torch.Tensor:
    """sum_i f_i P_i per sequence, averaged over the B sequences (eqs. 17-20, without alpha); with
    `counted_BS`, each sequence's T is its counted tokens (a packed row's padding left out), and a
    sequence without any is left out of the average. `context_group`: the rows' tokens are split over
    these ranks (context parallelism): each sequence's counts and affinities are summed over them, and
    every rank gets the loss of the whole rows (its gradient scaled for ranks that average theirs)."""
    B, S, E = scores_BSE.shape
    K = topk_idx_BSK.shape[-1]
    probs_BSE = scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)
    ones_BSK = torch.ones_like(topk_idx_BSK, dtype=scores_BSE.dtype)
    if counted_BS is None and context_group is None:
        chosen_BE = torch.zeros(B, E, dtype=scores_BSE.dtype, device=scores_BSE.device)
        chosen_BE.scatter_add_(1, topk_idx_BSK.reshape(B, S * K), ones_BSK.reshape(B, S * K))
        frac_BE = chosen_BE * (E / (K * S))
        return (frac_BE * probs_BSE.mean(dim=1)).sum(dim=-1).mean()
    weight_BS1 = (counted_BS.unsqueeze(-1).to(scores_BSE.dtype) if counted_BS is not None
                  else scores_BSE.new_ones(B, S, 1))
    chosen_BE = torch.zeros(B, E, dtype=scores_BSE.dtype, device=scores_BSE.device)
    chosen_BE.scatter_add_(1, topk_idx_BSK.reshape(B, S * K), (ones_BSK * weight_BS1).reshape(B, S * K))
    tokens_B1 = weight_BS1.sum(dim=1)
    prob_sum_BE = (probs_BSE * weight_BS1).sum(dim=1)
    if context_group is not None:
        counts_BE1 = torch.cat([chosen_BE, tokens_B1], dim=-1)  # no gradient: one plain sum
        sum_over(counts_BE1, context_group)
        chosen_BE, tokens_B1 = counts_BE1[:, :E], counts_BE1[:, E:]
        prob_sum_BE = sum_for_mean(prob_sum_BE, context_group)
    mean_prob_BE = prob_sum_BE / tokens_B1.clamp(min=1)
    frac_BE = chosen_BE * (E / K) / tokens_B1.clamp(min=1)
    rows_B = (tokens_B1.squeeze(-1) > 0).to(scores_BSE.dtype)
    return ((frac_BE * mean_prob_BE).sum(dim=-1) * rows_B).sum() / rows_B.sum().clamp(min=1)


def batch_balance_loss(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, context_group=None) -> torch.Tensor:
    """sum_i f_i P_i over all T tokens at once (the classic auxiliary loss, without alpha; under
    context parallelism over the tokens of every rank of `context_group`)."""
    return sequence_balance_loss(scores_TE.unsqueeze(0), topk_idx_TK.unsqueeze(0), None, context_group)


def global_balance_loss(scores_TE: torch.Tensor, counts_E: torch.Tensor, tokens, top_k: int) -> torch.Tensor:
    """sum_i f_i P_i with f_i = E / (K T_all) * counts_E (summed over ranks: no gradient) and P_i this
    rank's mean normalised score (without alpha)."""
    E = scores_TE.shape[-1]
    probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    frac_E = (counts_E * (E / top_k) / tokens).to(scores_TE.dtype)  # tokens: a number or a 0-dim tensor
    return (frac_E * probs_TE.mean(dim=0)).sum()


def router_z_loss(logits_BVE: torch.Tensor, context_group=None) -> torch.Tensor:
    """Mean over tokens of logsumexp over experts of the router logits, squared (without alpha);
    `context_group`: the mean over the tokens of every rank of it (their counts may differ: MTP's
    last positions of a row lie on one rank), its gradient scaled for ranks that average theirs."""
    z = torch.logsumexp(logits_BVE.float(), dim=-1).square()
    if context_group is None:
        return z.mean()
    count = sum_over(torch.tensor([float(z.numel())], device=z.device), context_group)
    return (sum_for_mean(z.sum().reshape(1), context_group) / count.clamp(min=1)).squeeze(0)


def max_violation(load_E: torch.Tensor) -> float:
    """MaxVio = (max load - mean load) / mean load; 0 for a step without tokens."""
    load_E = load_E.double()
    mean = load_E.mean()
    return 0.0 if mean == 0 else float((load_E.max() - mean) / mean)
