"""The end of a training step for MoE routers: loads summed over ranks, MaxVio, the loss-free bias update.

Loss-Free Balancing (arXiv 2408.15664 Algorithm 1; DeepSeek-V3 report eq. 16's bias): after each
step, b_i += u * sign(mean load - load_i), with loads counted over the whole step on every rank.

The step is split so that a trainer can reduce the statistics together with its other metrics in
one collective: `local_moe_stats(model)` gives this rank's contributions (tensors to be summed over
all ranks), `apply_moe_step(model, summed, speed)` updates the biases this rank holds and returns
what the step's routing looked like. Routers another pipeline rank holds (still on the meta device)
contribute zeros, and their values arrive through the same sum, so every rank reports every layer.
`finish_moe_step(model, speed, group)` does both with its own all-reduce.

Shape legend: L MoE layers (routers, MTP blocks included), E routed experts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moetron.models.common.balance import max_violation
from moetron.models.common.router import TopKRouter


@dataclass
class MoEStepStats:
    """What one step's routing looked like, per MoE layer (index: the router's layer_idx)."""

    tokens_per_expert: dict[int, list[int]] = field(default_factory=dict)
    maxvio: dict[int, float] = field(default_factory=dict)
    bias_abs_mean: dict[int, float] = field(default_factory=dict)
    bias: dict[int, list[float]] = field(default_factory=dict)  # per expert, after the update

    @property
    def maxvio_mean(self) -> float:
        return sum(self.maxvio.values()) / max(len(self.maxvio), 1)


def routers(model: nn.Module) -> list[TopKRouter]:
    """All TopKRouter modules of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def _held(router: TopKRouter) -> bool:
    return not router.expert_bias.is_meta


@torch.no_grad()
def local_moe_stats(model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's part, float64 on `device`, to be summed over all ranks: `loads_LE` (tokens each
    expert received this step), `bias_LE` (the bias before the update, once per rank holding it)
    and `holders_L` (how many ranks hold each router). Empty for a model without routers."""
    all_routers = routers(model)
    if not all_routers:
        return {}
    E = all_routers[0].expert_bias.shape[0]
    zeros_E = torch.zeros(E, dtype=torch.float64, device=device)
    loads_LE = torch.stack([r.tokens_per_expert.double() if _held(r) else zeros_E for r in all_routers])
    bias_LE = torch.stack([r.expert_bias.double() if _held(r) else zeros_E for r in all_routers])
    holders_L = torch.tensor([float(_held(r)) for r in all_routers], dtype=torch.float64, device=device)
    return {"loads_LE": loads_LE, "bias_LE": bias_LE, "holders_L": holders_L}


@torch.no_grad()
def apply_moe_step(model: nn.Module, summed: dict[str, torch.Tensor], bias_update_speed: Optional[float] = None
                   ) -> MoEStepStats:
    """Update the loss-free biases from the loads summed over all ranks (balance_mode loss_free;
    speed from the config unless given, so a schedule can pass 0 late in training), reset the load
    counters, and return the step's statistics. Every rank computes every layer's new bias from the
    same sums, so the logged values need no second collective; holders keep theirs."""
    stats = MoEStepStats()
    all_routers = routers(model)
    if not all_routers:
        return stats
    loads_LE = summed["loads_LE"].cpu()
    # each holder sent the same float32 bias: the sum over n holders divided by n is exact
    bias_LE = (summed["bias_LE"].cpu() / summed["holders_L"].cpu().clamp_min(1)[:, None]).float()
    for i, router in enumerate(all_routers):
        load_E, bias_E = loads_LE[i], bias_LE[i]
        speed = router.settings.bias_update_speed if bias_update_speed is None else bias_update_speed
        if router.settings.balance_mode == "loss_free" and speed > 0:
            # the sign in float64: exact for any token count (float32 is exact to 2^24 per layer only)
            bias_E = bias_E + speed * torch.sign(load_E.mean() - load_E).to(bias_E.dtype)
        if _held(router):
            router.expert_bias.copy_(bias_E)
            router.tokens_per_expert.zero_()
        stats.tokens_per_expert[router.layer_idx] = [int(v) for v in load_E.tolist()]
        stats.maxvio[router.layer_idx] = max_violation(load_E)
        stats.bias_abs_mean[router.layer_idx] = float(bias_E.abs().mean())
        stats.bias[router.layer_idx] = [float(v) for v in bias_E.tolist()]
    return stats


def finish_moe_step(model: nn.Module, bias_update_speed: Optional[float] = None, group=None) -> MoEStepStats:
    """Close a training step: sum this rank's statistics over `group` (all ranks that route tokens)
    and apply them (`apply_moe_step`)."""
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    local = local_moe_stats(model, device)
    if group is not None and dist.is_initialized():
        for tensor in local.values():
            dist.all_reduce(tensor, group=group)
    return apply_moe_step(model, local, bias_update_speed)
