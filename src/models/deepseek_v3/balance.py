"""Load balancing of routed experts: balance losses, MaxVio and the loss-free bias update.

- Complementary sequence-wise loss (report eqs. 17-20): per sequence, f_i = E / (K S) * (tokens
  choosing i) and P_i = mean over the sequence of s'_{i,t} = s_{i,t} / sum_j s_{j,t};
  L = alpha * sum_i f_i P_i, averaged over sequences.
- Classic auxiliary loss: the same over all tokens of the micro-batch (the baseline of
  Loss-Free Balancing, arXiv 2408.15664, alpha 1e-3).
- Loss-free update (arXiv 2408.15664 Algorithm 1): after each step, b_i += u * sign(mean - load_i),
  with loads counted over the whole step.
- MaxVio_batch = (max_i load_i - mean load) / mean load.

Shape legend: B batch, S sequence, T tokens, E routed experts, K experts per token, L MoE layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def sequence_balance_loss(scores_BSE: torch.Tensor, topk_idx_BSK: torch.Tensor) -> torch.Tensor:
    """sum_i f_i P_i per sequence, averaged over the B sequences (eqs. 17-20, without alpha)."""
    B, S, E = scores_BSE.shape
    K = topk_idx_BSK.shape[-1]
    probs_BSE = scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)
    mean_prob_BE = probs_BSE.mean(dim=1)
    chosen_BE = torch.zeros(B, E, dtype=scores_BSE.dtype, device=scores_BSE.device)
    chosen_BE.scatter_add_(1, topk_idx_BSK.reshape(B, S * K), torch.ones_like(topk_idx_BSK, dtype=scores_BSE.dtype).reshape(B, S * K))
    frac_BE = chosen_BE * (E / (K * S))
    return (frac_BE * mean_prob_BE).sum(dim=-1).mean()


def batch_balance_loss(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
    """sum_i f_i P_i over all T tokens at once (the classic auxiliary loss, without alpha)."""
    return sequence_balance_loss(scores_TE.unsqueeze(0), topk_idx_TK.unsqueeze(0))


def max_violation(load_E: torch.Tensor) -> float:
    """MaxVio = (max load - mean load) / mean load; 0 for a step without tokens."""
    load_E = load_E.double()
    mean = load_E.mean()
    return 0.0 if mean == 0 else float((load_E.max() - mean) / mean)


@dataclass
class MoEStepStats:
    """What one step's routing looked like, per MoE layer (index: the router's layer_idx)."""

    tokens_per_expert: dict[int, list[int]] = field(default_factory=dict)
    maxvio: dict[int, float] = field(default_factory=dict)
    bias_abs_mean: dict[int, float] = field(default_factory=dict)

    @property
    def maxvio_mean(self) -> float:
        return sum(self.maxvio.values()) / max(len(self.maxvio), 1)


def routers(model: nn.Module):
    """All TopKRouter modules of `model`, in module order."""
    from moetron.models.deepseek_v3.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


@torch.no_grad()
def finish_moe_step(model: nn.Module, bias_update_speed: Optional[float] = None, group=None) -> MoEStepStats:
    """Close a training step: sum loads over `group` (data/expert-parallel ranks), record stats,
    update loss-free biases (balance_mode loss_free; speed from the config unless given, so a
    schedule can pass 0 late in training), and reset the counters for the next step.

    Routers still on the meta device (layers another pipeline rank holds) add zero loads; their
    statistics arrive through the same reductions, so every rank reports every layer."""
    stats = MoEStepStats()
    all_routers = routers(model)
    if not all_routers:
        return stats
    held = [not r.expert_bias.is_meta for r in all_routers]
    E = all_routers[0].expert_bias.shape[0]
    # a rank that holds no router still joins the reductions, on the device its collectives use
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    loads_LE = torch.stack([r.tokens_per_expert if h else torch.zeros(E, dtype=torch.int64, device=device)
                            for r, h in zip(all_routers, held)])
    if group is not None and dist.is_initialized():
        dist.all_reduce(loads_LE, group=group)
    bias_abs_mean_L = torch.zeros(len(all_routers), device=device)
    for i, (router, load_E) in enumerate(zip(all_routers, loads_LE)):
        stats.tokens_per_expert[router.layer_idx] = load_E.tolist()
        stats.maxvio[router.layer_idx] = max_violation(load_E)
        if not held[i]:
            continue
        speed = router.cfg.bias_update_speed if bias_update_speed is None else bias_update_speed
        if router.cfg.balance_mode == "loss_free" and speed > 0:
            load_f = load_E.to(router.expert_bias.dtype)
            router.expert_bias += speed * torch.sign(load_f.mean() - load_f)
        bias_abs_mean_L[i] = router.expert_bias.abs().mean()
        router.tokens_per_expert.zero_()
    if group is not None and dist.is_initialized():  # holders agree; the others contribute 0
        dist.all_reduce(bias_abs_mean_L, op=dist.ReduceOp.MAX, group=group)
    for router, value in zip(all_routers, bias_abs_mean_L.tolist()):
        stats.bias_abs_mean[router.layer_idx] = value
    return stats
