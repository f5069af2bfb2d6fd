"""Allocate only the parts of a model this rank holds.

The trainer builds the model on the meta device (no memory), applies expert parallelism (which
slices the expert stacks, still on meta), asks the pipeline which modules this rank runs, and
materialises just those: `to_empty` on the device, then the model's own `init_weights(seed)`, which
seeds every tensor (and every routed expert) by its name so each part comes out exactly as it
would in the whole model on one process. Whatever another pipeline rank holds stays on meta, and
the helpers below keep it out of the optimizer, the gradient reductions and the checkpoint.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def materialize(model: nn.Module, held: Iterable[nn.Module], device: torch.device, seed: int) -> nn.Module:
    """Allocate `held` (submodules of `model`) on `device` and initialise them; the rest stays on meta.

    Parameters keep their identity: the meta tensors are swapped for allocated ones in place
    (`torch.utils.swap_tensors`), so what `parallelize` and the pipeline split recorded about them
    (expert parameters, which pipeline ranks hold a parameter) stays true."""
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for module in held:
            module.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    model.init_weights(seed=seed)
    return model


def held_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters this rank holds (not on the meta device), in model order."""
    return [p for p in model.parameters() if not p.is_meta]


def held_state_dict(model: nn.Module) -> dict:
    """`model.state_dict()` without the entries another rank holds."""
    return {name: t for name, t in model.state_dict().items() if not t.is_meta}


def load_held_state_dict(model: nn.Module, state: dict) -> None:
    """Load the entries this rank holds from `state`; every one of them must be there."""
    held = held_state_dict(model)
    missing = sorted(set(held) - set(state))
    if missing:
        raise KeyError(f"the checkpoint shard lacks {len(missing)} tensor(s) this rank holds, e.g. {missing[:3]}: "
                       "it was written with another parallel layout (parallel.pp / parallel.ep / parallel.layout)")
    model.load_state_dict({name: state[name] for name in held}, strict=False)
