"""The run's two floating-point dtypes (`precision.compute_dtype`, `precision.param_dtype`): what the
forward and backward compute in (autocast), and what the working weights are kept in.

DeepSeek-V3 computes with BF16 working weights and keeps float32 master weights, weight gradients
and optimizer states (report section 3.3): `param_dtype=bfloat16` (the default on GPUs) does that
(moetron.parallel.finalize keeps the masters). On a CPU the weights stay float32 unless set.
"""
from __future__ import annotations

import torch


def compute_dtype(precision, device: torch.device) -> torch.dtype:
    """precision.compute_dtype; auto: bfloat16 on CUDA, float32 elsewhere."""
    name = precision.compute_dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return getattr(torch, name)


def param_dtype(precision, device: torch.device) -> torch.dtype:
    """precision.param_dtype; auto: bfloat16 on CUDA when computing in bfloat16, else float32 (a CPU
    keeps float32 weights whatever it computes in: the tests' layouts equal one process there)."""
    name = precision.param_dtype
    if name == "auto":
        bf16 = device.type == "cuda" and compute_dtype(precision, device) == torch.bfloat16
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def dtype_problems(precision, device: torch.device) -> list[str]:
    """What cannot run together (each message names the key and the fix)."""
    if param_dtype(precision, device) == torch.float32 or compute_dtype(precision, device) != torch.float32:
        return []
    default = " (its default on a CPU)" if precision.compute_dtype == "auto" else ""
    return [f"precision.param_dtype={precision.param_dtype} computes with {precision.param_dtype} weights, which a "
            f"float32 compute dtype{default} cannot multiply: set precision.compute_dtype=bfloat16, or "
            "precision.param_dtype=float32"]
