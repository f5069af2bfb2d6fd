"""`precision.backend=te`: transformer-engine's Float8BlockScaling recipe (1x128 activation tiles,
128x128 weight blocks, E4M3, the report's scheme) runs the linear layers.

transformer-engine is optional: it builds and imports only with CUDA. With `te`, every nn.Linear in
the converted blocks runs through a `te.pytorch.Linear` that shares the layer's own weight (names,
checkpoints and Hugging Face mappings do not change) inside TE's FP8 autocast. The grouped experts
keep a stacked weight [E, N, K], which TE's GroupedLinear (one parameter per expert) cannot share,
so they run on the `torch` backend (torch's blockwise scaled GEMM, Hopper), which `te` therefore
needs too. On Blackwell, TE runs Float8BlockScaling by emulating it through MXFP8 (its own
documentation), and torch's blockwise GEMM is Hopper-only: `te` is refused there.

TE computes its weight gradients in the backward (B) action: a pipeline's W actions find nothing
to do for these layers, so zero-bubble schedules lose the bubble-filling but stay exact.
Not yet run by this project (no GPU here): benchmarks/gpu/device_check.sh holds it against
`emulated` on an H200.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn


def te_available(device: torch.device) -> tuple[bool, str]:
    """(whether the te backend can run here, what is missing if not)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
        if not hasattr(importlib.import_module("transformer_engine.common.recipe"), "Float8BlockScaling"):
            return False, "transformer-engine 2.3 or newer (this one has no Float8BlockScaling recipe)"
    except Exception as err:  # ImportError, or TE's own error without CUDA
        return False, f"transformer-engine with Float8BlockScaling (import failed: {type(err).__name__}: {err})"
    if device.type != "cuda":
        return False, "a CUDA device"
    return True, ""


def exact_scales_recipe():
    """TE's Float8BlockScaling with each tile's scale its amax / 448, as the other backends quantize
    (moetron.precision.quantize), so `te` can be held against `emulated` to rounding: TE's default
    rounds every scale up to a power of two (NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1 relaxes it for
    the whole process; this sets it on the recipe alone)."""
    from transformer_engine.common.recipe import Float8BlockScaling, QParams

    recipe = Float8BlockScaling()
    exact = QParams(power_2_scale=False, amax_epsilon=0.0)
    recipe.fp8_quant_fwd_inp = recipe.fp8_quant_fwd_weight = recipe.fp8_quant_bwd_grad = exact
    return recipe


def _fp8_autocast(recipe):
    import transformer_engine.pytorch as te
    if hasattr(te, "autocast"):  # TE 2.8+ names it autocast(recipe=...)
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


class TELinear(nn.Module):
    """An nn.Linear's weight run through te.pytorch.Linear under Float8BlockScaling. The TE module is
    made at the first forward, on the weight's device (the model is built on the meta device and
    materialized later), and kept out of the module tree: it holds this layer's weight, whose name
    stays `weight` here. TE computes the weight gradient inside its own backward, so a pipeline's W
    action cannot defer it (the weight-gradient converter refuses it). A bias (GPT-OSS's attention)
    stays this layer's own and is added after TE's GEMM, in the output's precision."""

    DEFERS_WEIGHT_GRADS = False

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        object.__setattr__(self, "_te", None)

    def _inner(self) -> nn.Module:
        import transformer_engine.pytorch as te
        if self._te is None:
            inner = te.Linear(self.in_features, self.out_features, bias=False, params_dtype=self.weight.dtype,
                              device=self.weight.device)
            object.__setattr__(self, "_te", inner)
        if self._te.weight is not self.weight:  # shared: the optimizer, checkpoints and ZeRO see one parameter
            self._te.weight = self.weight
        return self._te

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _fp8_autocast(exact_scales_recipe()):
            y = self._inner()(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend=te (Float8BlockScaling)"
