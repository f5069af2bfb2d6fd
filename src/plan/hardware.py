"""A cluster as the planner sees it (`conf/cluster/*.yaml`; `conf/cluster/template.yaml` documents
every key), and the efficiency factors a datasheet cannot know (`conf/plan.yaml`'s `plan` node).

Defaults of the factors, and where they come from (docs/PLANNER.md has the longer story):
- gemm_bf16 0.80: a BF16 8192^3 GEMM ran at 767-794 of 989 TFLOP/s on an H200
  (../shared/reference/h200-measurements.md);
- gemm_fp8 0.62: torch's blockwise FP8 GEMM (DeepSeek's 1x128 / 128x128 scaling) ran at 1207-1316 of
  1979 on the same H200, DeepGEMM's grouped MoE GEMMs at 1214-1346 on an H800 (its README);
- attention 0.45: FlashAttention-3 reaches about 60% of BF16 peak forward and 45% backward at head
  dimension 128 (Shah et al. 2024); MLA's 192/128 head dims do no better;
- a2a_ib 0.90, a2a_nvlink 0.95: DeepEP's normal kernels moved 43-58 GB/s per GPU over 50 GB/s
  InfiniBand (EP16-EP64) and 153-158 of 160 GB/s over NVLink on H800s (its README);
- comm_sms 20 of 132: the SMs DeepSeek-V3 gives its all-to-all kernels (report section 3.2.2), which
  the GEMMs of an overlapped chunk then run without;
- memory_bound_passes 10: norms, RoPE, SwiGLU, routing, permutation and FP8 casts move a layer's
  activations (what it writes, recomputed or not) about this many times over forward and backward
  at HBM speed: written and read once each, and every FP8 GEMM operand read in BF16 and written in
  FP8 once per orientation (forward, input gradient, weight gradient). The least certain factor:
  docs/PLANNER.md shows what it moves;
- expert_imbalance 1.10: the busiest expert-parallel rank's routed rows over the mean; loss-free
  balancing keeps MaxVio near 0.1 (Wang et al. 2024), and the trainer logs it (`--calibrate`);
- goodput 0.90: the share of a job's GPU time that trains (restarts, checkpoints, evaluation and
  stragglers take the rest; Llama 3's 54 days on 16K GPUs had over 90%).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional


@dataclass
class Hardware:
    name: str
    nodes: int
    gpus_per_node: int
    nvlink_gbps: float  # GB/s per GPU inside a node, each direction
    ib_gbps: float  # GB/s per GPU between nodes
    bf16_tflops: float  # dense peak
    fp8_tflops: float  # dense peak
    memory_gib: float
    hbm_tbps: float
    price_per_gpu_hour: float
    sms: int = 132

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def from_config(cls, cluster) -> "Hardware":
        missing = [k for k in ("nodes", "gpus_per_node") if cluster.get(k) is None]
        if missing:
            raise ValueError(f"cluster.{missing[0]} is not set: the planner needs the cluster's size "
                             f"(set cluster.{missing[0]}=..., or pick cluster=h800_2048)")
        hw = cls(name=cluster.name, nodes=int(cluster.nodes), gpus_per_node=int(cluster.gpus_per_node),
                 nvlink_gbps=float(cluster.nvlink_gbps), ib_gbps=float(cluster.ib_gbps),
                 bf16_tflops=float(cluster.peak_tflops), fp8_tflops=float(cluster.fp8_tflops),
                 memory_gib=float(cluster.memory_gib), hbm_tbps=float(cluster.hbm_tbps),
                 price_per_gpu_hour=float(cluster.price_per_gpu_hour), sms=int(cluster.sms))
        needed = {"peak_tflops": hw.bf16_tflops, "fp8_tflops": hw.fp8_tflops, "memory_gib": hw.memory_gib,
                  "hbm_tbps": hw.hbm_tbps}
        if hw.gpus_per_node > 1:
            needed["nvlink_gbps"] = hw.nvlink_gbps
        if hw.nodes > 1:
            needed["ib_gbps"] = hw.ib_gbps
        for key, value in needed.items():
            if value <= 0:
                raise ValueError(f"cluster.{key}={value}: the planner needs it (conf/cluster/template.yaml says what "
                                 f"each key is); set cluster.{key}=...")
        return hw


@dataclass
class Efficiency:
    gemm_bf16: float = 0.80
    gemm_fp8: float = 0.62
    attention: float = 0.45
    a2a_ib: float = 0.90
    a2a_nvlink: float = 0.95
    comm_sms: int = 20
    memory_bound_passes: float = 10.0
    expert_imbalance: float = 1.10
    goodput: float = 0.90
    p2p_latency_us: float = 20.0
    reserved_gib: float = 5.0  # CUDA context, NCCL and dispatch buffers, allocator slack

    @classmethod
    def from_config(cls, plan, overrides: Optional[dict] = None) -> "Efficiency":
        values = {f.name: plan[f.name] for f in fields(cls) if f.name in plan}
        values.update(overrides or {})
        return cls(**values)
