"""Routing replay: the experts each token was routed to while sampling are the ones the training
forward uses, so that an MoE policy's importance ratio compares the same computation (without it
the router may pick other experts in training, and the ratio is off from the first step).

    with recording(model) as routes:          # routes[router name]: its chosen experts [B, S, K]
        completions = generate(model, ...)
    with replaying(model, routes):            # the same experts for the same tokens; the gates
        out = model(sequences_BS[:, :-1], ...)   # still come from (and train) the router

The recorded forwards must cover the training forward's tokens in order: generation runs the
prompts, then one token per step, and `recording` joins them along the sequence.

Shape legend: B sequences, S tokens, K experts per token.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from moetron.models.common.router import TopKRouter


def _routers(model: nn.Module) -> dict[str, TopKRouter]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TopKRouter)}


@contextmanager
def recording(model: nn.Module):
    """Yields a dict that, after the block, maps each router that ran (by module name) to its chosen
    experts [B, S, K] over all the forwards of the block, joined along S. (DeepSeek-V3's MTP depths
    do not run while sampling: their routers choose for themselves in training.)"""
    routers = _routers(model)
    for router in routers.values():
        router.recorded = []
    routes: dict[str, torch.Tensor] = {}
    try:
        yield routes
    finally:
        for name, router in routers.items():
            if router.recorded:  # expert ids as int16: a quarter of int64's bytes per token and layer
                routes[name] = torch.cat(router.recorded, dim=1).to(torch.int16)
            router.recorded = None


@contextmanager
def replaying(model: nn.Module, routes: dict[str, torch.Tensor], length: int | None = None):
    """Each router in `routes` uses its recorded experts (their first `length` positions) in the block."""
    routers = _routers(model)
    unknown = sorted(set(routes) - set(routers))
    if unknown:
        raise ValueError(f"routing replay: recorded routers {unknown[:3]} are not in the model")
    for name, chosen in routes.items():
        routers[name].replayed = chosen if length is None else chosen[:, :length]
    try:
        yield
    finally:
        for router in routers.values():
            router.replayed = None


def rollout_loads(model: nn.Module, routes: dict[str, torch.Tensor], counted_BS: torch.Tensor) -> dict[str, torch.Tensor]:
    """Router name -> [E] tokens it sent to each expert over the `counted_BS` positions of the
    recorded routes (int64): the experts' loads while sampling."""
    routers = _routers(model)
    S = counted_BS.shape[1]
    out = {}
    for name, chosen_BSK in routes.items():
        E = routers[name].expert_bias.shape[0]
        chosen_TK = chosen_BSK[:, :S][counted_BS.to(chosen_BSK.device)]
        out[name] = torch.bincount(chosen_TK.flatten().long(), minlength=E).cpu()
    return out
