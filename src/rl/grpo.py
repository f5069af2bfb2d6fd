"""Group Relative Policy Optimization (DeepSeekMath arXiv 2402.03300 section 4.1, eq. 3; used for
DeepSeek-R1 and DeepSeek-V3's RL, report section 5.2.2): no critic; G completions are sampled per
prompt and each one's advantage is its reward against its group's,

    A_i = (r_i - mean(r_1..G)) / std(r_1..G)                                  (outcome supervision)

and the policy maximises, per completion token t, the clipped importance-weighted advantage
minus beta times an unbiased estimate of KL(pi || pi_ref),

    min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) - beta (pi_ref / pi - log(pi_ref / pi) - 1),
    rho_t = pi(o_t) / pi_old(o_t)   (pi_old: the policy that sampled)

summed over the tokens of the global batch and divided by their number (`denominator`): every
token weighs the same, as the issue asks and DAPO argues, where DeepSeekMath's eq. 3 averages each
completion over its own tokens first (long completions then weigh less per token). The group's
standard deviation is the population one (over G, not G - 1). Log-probabilities are those of the
distribution sampled from: the softmax of logits / temperature.

Shape legend: P prompts, G completions per prompt, B = P x G completions, T completion tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[P, G] advantages: each reward minus its group's mean, over its group's standard deviation
    (a group whose rewards are all equal gets 0)."""
    mean_P1 = rewards_PG.mean(dim=1, keepdim=True)
    std_P1 = rewards_PG.std(dim=1, keepdim=True, unbiased=False)
    return (rewards_PG - mean_P1) / (std_P1 + eps)


def token_logprobs(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False):
    """[B, T] log-probability of each token under the softmax of the logits that predict it over
    `temperature` (in float32; 0 means greedy and is taken as 1); `with_entropy`: also [B, T] the
    entropy (nats) of each of those distributions, without gradient, from the same log-softmax."""
    logp_BTV = torch.log_softmax(logits_BTV.float() / (temperature or 1.0), dim=-1)
    chosen_BT = logp_BTV.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return chosen_BT
    with torch.no_grad():
        return chosen_BT, -(logp_BTV.exp() * logp_BTV).sum(dim=-1)


@dataclass
class GRPOTerms:
    loss: torch.Tensor  # what to back-propagate
    kl: torch.Tensor  # summed per-token KL estimates / denominator (0 without a reference)
    clipped: torch.Tensor  # tokens whose ratio the clip bound, summed
    ratio: torch.Tensor  # per-token ratios, summed
    tokens: torch.Tensor  # counted tokens


def grpo_loss(logp_BT: torch.Tensor, logp_old_BT: torch.Tensor, advantages_B: torch.Tensor, mask_BT: torch.Tensor,
              clip_eps: float, denominator: float, beta: float = 0.0,
              logp_ref_BT: Optional[torch.Tensor] = None) -> GRPOTerms:
    """The negated GRPO objective of the module docstring over the tokens of `mask_BT`, divided by
    `denominator` (the global batch's completion tokens, over micro-batches x data ranks as the
    trainer's mean expects)."""
    mask_BT = mask_BT.to(logp_BT)  # the rollout's tensors may still be on the host
    ratio_BT = torch.exp(logp_BT - logp_old_BT.to(logp_BT))
    adv_B1 = advantages_B.to(logp_BT).unsqueeze(1)
    unclipped_BT, clipped_BT = ratio_BT * adv_B1, ratio_BT.clamp(1 - clip_eps, 1 + clip_eps) * adv_B1
    objective_BT = torch.minimum(unclipped_BT, clipped_BT)
    kl_BT = torch.zeros_like(logp_BT)
    if beta > 0:
        if logp_ref_BT is None:
            raise ValueError("GRPO with beta > 0 needs the reference model's log-probabilities")
        log_ref_ratio_BT = logp_ref_BT.to(logp_BT) - logp_BT
        kl_BT = torch.exp(log_ref_ratio_BT) - log_ref_ratio_BT - 1  # >= 0, unbiased (Schulman's k3)
    loss = ((-objective_BT + beta * kl_BT) * mask_BT).sum() / denominator
    with torch.no_grad():
        bound_BT = (clipped_BT < unclipped_BT).to(mask_BT.dtype)  # the clip chose the smaller term
        return GRPOTerms(loss, (kl_BT * mask_BT).sum().detach() / denominator, (bound_BT * mask_BT).sum(),
                         (ratio_BT * mask_BT).sum(), mask_BT.sum())
