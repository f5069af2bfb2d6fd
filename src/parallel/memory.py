"""Memory switches: what a model keeps for its backward, changed without changing what it computes
beyond rounding (issue 26; DeepSeek-V3 report sections 3.2.3 and 3.3.3).

`memory.<switch>` is a run setting (free to change on resume). The `MemorySwitches` converter
(moetron.core.convert) sets the `<switch>` slot of every module that declares one:

- `gate_before_down_proj` (MoE layers): the routed experts scale their SwiGLU output by the routing
  weight before the down-projection (linear, so the output is the same), and the combine only sums:
  it keeps no expert outputs for its backward (K rows of the hidden size per token otherwise, in
  float32), and the gate's gradient comes from the SwiGLU output, recomputed under
  `recompute.swiglu`.
- `chunked_loss` (the model's loss tail): the output head and its cross entropy run a chunk of
  tokens at a time (moetron.models.common.linear_cross_entropy), keeping no [tokens, vocab] float32
  logits for the main head and every MTP head, at the cost of the head's GEMM once more in the
  backward.

A switch no module has a slot for is moot (a dense model has no routed experts), not an error.
"""
from __future__ import annotations

from torch import nn

MEMORY_SWITCHES = ("gate_before_down_proj", "chunked_loss")


class MemorySwitches:
    name = "memory"

    def __init__(self, switches: dict[str, bool]) -> None:
        unknown = sorted(set(switches) - set(MEMORY_SWITCHES))
        if unknown:
            raise ValueError(f"memory: no switch {unknown}; the switches are {MEMORY_SWITCHES}")
        self.on = [k for k in MEMORY_SWITCHES if switches.get(k)]

    def convert(self, root: nn.Module) -> None:
        for module in root.modules():
            for switch in self.on:
                if hasattr(module, switch):
                    setattr(module, switch, True)

    def problems(self, root: nn.Module) -> list[str]:
        return []
