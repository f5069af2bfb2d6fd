"""Module converters: swap submodules for others that share their parameters (the seam `parallelize`
uses for weight-gradient deferral, and FP8 linears will use), instead of editing modules in place.

    replace_modules(model, lambda m: type(m) is nn.Linear, lambda m: MyLinear.from_linear(m))

The new module takes the old one's place under the same name, so parameter names, checkpoints and
Hugging Face mappings are unchanged; the parameters themselves are the same objects (tied weights
stay tied, a model on the meta device stays on it).
"""
from __future__ import annotations

from typing import Callable

from torch import nn


def replace_modules(root: nn.Module, match: Callable[[nn.Module], bool],
                    make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule of `root` for which `match` holds by `make(old)`; return how many.

    A module reached under several names is converted once and the same replacement is put at each.
    """
    made: dict[int, nn.Module] = {}
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                if id(child) not in made:
                    made[id(child)] = make(child)
                setattr(parent, name, made[id(child)])
    return len(made)
