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


@torch.no_grad()
def cast_parameters(params: Iterable[nn.Parameter], dtype: torch.dtype) -> None:
    """Each parameter's data in `dtype`, in place (the parameter objects stay: hooks and the records
    of `parallelize` and the pipeline split still hold)."""
    for p in params:
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


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


def expert_rows(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Parameter name -> (global index of its row 0, rows of the whole stack), for the parameters of
    expert stacks (modules with `first_expert` and `global_experts` slots, which
    moetron.parallel.expert_parallel.shard_experts keeps true under EP)."""
    rows = {}
    for prefix, module in model.named_modules():
        first, total = getattr(module, "first_expert", None), getattr(module, "global_experts", None)
        if first is not None and total is not None:
            for name, _ in module.named_parameters(recurse=False):
                rows[f"{prefix}.{name}" if prefix else name] = (first, total)
    return rows


def merge_shards(shards: list[tuple[dict, int]], whole_shapes: dict) -> dict:
    """A whole model's state from per-rank held state dicts, each with the EP index that wrote it:
    an entry whose dim 0 is smaller than the whole tensor's is rows [ep x rows, (ep + 1) x rows)."""
    whole: dict = {}
    rows_filled: dict = {}  # name -> rows written, for EP-sharded tensors
    for state, ep_index in shards:
        for name, tensor in state.items():
            shape = whole_shapes[name]
            if tuple(tensor.shape) == tuple(shape):
                whole.setdefault(name, tensor)
                continue
            if name not in whole:
                whole[name] = tensor.new_empty(shape)
            rows = tensor.shape[0]
            whole[name][ep_index * rows:(ep_index + 1) * rows] = tensor
            rows_filled.setdefault(name, set()).update(range(ep_index * rows, (ep_index + 1) * rows))
    gaps = sorted(name for name, filled in rows_filled.items() if len(filled) != whole_shapes[name][0])
    if gaps:
        raise KeyError(f"the shards cover only some experts of {gaps[:3]}: a model-*-ep<i>.pt file is missing")
    missing = sorted(set(whole_shapes) - set(whole))
    if missing:
        raise KeyError(f"the shards lack {len(missing)} tensor(s), e.g. {missing[:3]}")
    return whole
