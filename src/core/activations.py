"""The gated activation of the FFNs here, in one place: layers use it, and the FP8 converter swaps in
its FP8-cached twin (moetron.precision.fp8_swiglu) only where a layer's activation is this one."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up (Shazeer 2020)."""
    return F.silu(gate) * up
