"""Module converters: the one seam through which parallelism, precision and memory policies change a
built model without touching its code (torchtitan's `model_converter` is the example).

A converter has a `name` (its place in `CONVERTER_ORDER`), `convert(root)`, and `problems(root)`:
what it should have reached and could not, asked after every converter has run. `apply_converters`
runs them in the one order that works (FP8 swaps plain linears for FP8 ones before the
weight-gradient deferral hands its store to every layer with a slot; recomputation and the memory
switches only set slots), then raises one ValueError listing every problem, so a combination that cannot work is
refused when the model is built, never skipped silently.

`replace_modules` is how a converter swaps a submodule for another that shares its parameters:

    replace_modules(model, lambda m: type(m) is nn.Linear, lambda m: MyLinear.from_linear(m))

The new module takes the old one's place under the same name, so parameter names, checkpoints and
Hugging Face mappings are unchanged; the parameters themselves are the same objects (tied weights
stay tied, a model on the meta device stays on it).
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

from torch import nn

CONVERTER_ORDER = ("fp8", "defer_weight_grads", "recompute", "memory")


class ModuleConverter(Protocol):
    name: str  # one of CONVERTER_ORDER

    def convert(self, root: nn.Module) -> None:
        """Change `root` in place (swap modules, fill their slots)."""

    def problems(self, root: nn.Module) -> list[str]:
        """After every converter ran: what this one should have reached and could not."""


def apply_converters(root: nn.Module, converters: Sequence[ModuleConverter]) -> None:
    """Run `converters` on `root` in CONVERTER_ORDER, then refuse (ValueError) what they could not do."""
    names = [c.name for c in converters]
    unknown = [n for n in names if n not in CONVERTER_ORDER]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"converters {names}: each at most once, from {CONVERTER_ORDER}")
    ordered = sorted(converters, key=lambda c: CONVERTER_ORDER.index(c.name))
    for converter in ordered:
        converter.convert(root)
    problems = [f"{c.name}: {p}" for c in ordered for p in c.problems(root)]
    if problems:
        raise ValueError("these conversions cannot be applied together:\n  " + "\n  ".join(problems))


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
