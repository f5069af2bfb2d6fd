"""Efficiency factors from this project's own measurements (`moetron-plan --calibrate FILE`):

- benchmarks/gpu/fp8_linear.py --json: the median achieved BF16 and FP8 TFLOP/s of its linear
  layers (forward and backward, quantization included) over the cluster's peaks -> gemm_bf16,
  gemm_fp8;
- a run's metrics.jsonl: its mean batch MaxVio over the second half of the run -> expert_imbalance
  = 1 + MaxVio (an expert's excess bounds an EP rank's, which holds several experts).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from moetron.plan.hardware import Hardware
from moetron.report.records import jsonl_records


def _from_benchmark(data: dict, hw: Hardware) -> dict:
    rows = data["linear"]
    out = {"gemm_bf16": statistics.median(r["bf16_tflops"] for r in rows) / hw.bf16_tflops}
    fp8 = [r["fp8_tflops"] for r in rows if r.get("fp8_tflops")]
    if fp8 and data.get("backend") in ("torch", "te"):  # the emulated backend says nothing about a GPU
        out["gemm_fp8"] = statistics.median(fp8) / hw.fp8_tflops
    return out


def _from_metrics(records: list[dict]) -> dict:
    values = [r.get("moe/maxvio_batch") for r in records]
    values = [v for v in values if v is not None]
    if not values:
        raise ValueError("no moe/maxvio_batch in the metrics: calibrate from a run of an MoE model")
    half = values[len(values) // 2:]
    return {"expert_imbalance": 1.0 + sum(half) / len(half)}


def calibrate(paths: list[str], hw: Hardware) -> dict:
    """Factors measured in `paths` (later files win where two set the same factor)."""
    out: dict = {}
    for path in paths:
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            out.update(_from_metrics(jsonl_records(text, f"--calibrate {path}")))  # JSON lines
            continue
        if isinstance(data, dict) and "linear" in data:
            out.update(_from_benchmark(data, hw))
        elif isinstance(data, dict) and "moe/maxvio_batch" in data:
            out.update(_from_metrics([data]))
        else:
            raise ValueError(f"--calibrate {path}: neither benchmarks/gpu/fp8_linear.py --json output nor a "
                             "metrics.jsonl")
    return out
