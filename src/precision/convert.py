"""FP8 for a model's linear layers and grouped experts, through the module converter seam
(moetron.parallel.convert): nothing in the model's code changes.

Every nn.Linear inside the given modules becomes an FP8Linear on the same weight; every layer with
an `expert_gemm` slot (grouped experts) gets the FP8 grouped GEMM. A model spec decides which
modules: DeepSeek-V3's decoder and MTP blocks (attention projections, dense MLPs, shared and routed
experts), never the embedding, the output head, the router, norms or the attention core, which stay
in the compute dtype or FP32 as in the report (section 3.3.1).
"""
from __future__ import annotations

from torch import nn

from moetron.parallel.convert import replace_modules
from moetron.precision.fp8_linear import FP8GroupedGemm, FP8Linear


def convert_to_fp8(module: nn.Module, backend: str, pow2_expert_inputs: bool = False) -> int:
    """FP8 for the linears and grouped experts inside `module` (a resolved backend: "emulated" or
    "torch"; `pow2_expert_inputs` with FP8 dispatch, whose rows then quantize again exactly);
    returns how many layers were converted."""
    count = replace_modules(module, lambda m: type(m) is nn.Linear, lambda m: FP8Linear.from_linear(m, backend))
    for m in module.modules():
        if hasattr(m, "expert_gemm"):
            m.expert_gemm = FP8GroupedGemm(backend, pow2_expert_inputs)
            count += 1
    return count
