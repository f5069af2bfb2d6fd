"""FP8 for a model's linear layers and grouped experts, through the module converter seam
(moetron.core.convert): nothing in the model's code changes.

Every nn.Linear inside the given modules becomes an FP8 linear on the same weight (FP8Linear, or
with the `te` backend a TELinear); every layer with an `expert_gemm` slot (grouped experts) gets the
FP8 grouped GEMM. A model spec decides which modules: DeepSeek-V3's decoder and MTP blocks
(attention projections, dense MLPs, shared and routed experts), never the embedding, the output
head, the router, norms or the attention core, which stay in the compute dtype or FP32 as in the
report (section 3.3.1).

With `cache_activations` (report section 3.3.3), FP8 linears keep their input's FP8 tiles for the
backward, and SwiGLU layers (an `activation` slot) cache their inputs in FP8 and recompute the
output. Inputs named in `high_precision_inputs` stay as they are: the report keeps the attention
output projection's input in a wider format (E5M6), which torch has no dtype for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from moetron.core.activations import swiglu
from moetron.core.convert import replace_modules
from moetron.precision.fp8_linear import FP8GroupedGemm, FP8Linear
from moetron.precision.fp8_swiglu import FP8_INPUTS, fp8_cached_swiglu


@dataclass(frozen=True)
class FP8Recipe:
    """What `precision=fp8` turns on. `backend`: resolved, "emulated" | "torch" | "te"; `dispatch`:
    tokens travel to their experts in FP8 (their tiles then quantize again exactly: pow2 scales);
    `cache_activations`: activations kept for the backward in FP8."""
    backend: str
    dispatch: bool = False
    cache_activations: bool = False


def _make_linear(recipe: FP8Recipe):
    if recipe.backend == "te":
        from moetron.precision.te_backend import TELinear
        return TELinear
    return lambda m: FP8Linear.from_linear(m, recipe.backend, recipe.cache_activations)


class FP8Conversion:
    """The FP8 converter (moetron.core.convert): `convert_to_fp8` on each module `scopes(root)`
    gives; a problem where a linear inside them is still not FP8 (a converter that ran before
    swapped it for a class this one does not know)."""

    name = "fp8"

    def __init__(self, recipe: FP8Recipe, scopes: Callable[[nn.Module], list[nn.Module]],
                 high_precision_inputs: tuple[str, ...] = ()) -> None:
        self.recipe, self.scopes, self.high_precision_inputs = recipe, scopes, high_precision_inputs

    def convert(self, root: nn.Module) -> None:
        for scope in self.scopes(root):
            convert_to_fp8(scope, self.recipe, self.high_precision_inputs)

    def problems(self, root: nn.Module) -> list[str]:
        return [f"{name} ({type(m).__name__}) is not FP8: precision.fp8 did not reach it"
                for scope in self.scopes(root) for name, m in scope.named_modules()
                if isinstance(m, nn.Linear) and not isinstance(m, FP8Linear)]


def convert_to_fp8(module: nn.Module, recipe: FP8Recipe, high_precision_inputs: tuple[str, ...] = ()) -> int:
    """FP8 for the linears and grouped experts inside `module`; returns how many layers were
    converted. `high_precision_inputs`: attribute names of linears whose input is never cached in
    FP8."""
    count = replace_modules(module, lambda m: type(m) is nn.Linear, _make_linear(recipe))
    expert_backend = "torch" if recipe.backend == "te" else recipe.backend  # te: see te_backend
    for name, m in module.named_modules():
        if isinstance(m, FP8Linear) and name.rsplit(".", 1)[-1] in high_precision_inputs:
            m.cache_input = False
        if hasattr(m, "expert_gemm"):
            m.expert_gemm = FP8GroupedGemm(expert_backend, recipe.dispatch, recipe.cache_activations)
            count += 1
        if recipe.cache_activations and getattr(m, "activation", None) is swiglu:
            m.activation = fp8_cached_swiglu  # another activation (GPT-OSS's clamped one) keeps its inputs
            m.recompute_inputs = FP8_INPUTS  # under recompute.swiglu too, the region keeps them in FP8
    return count
