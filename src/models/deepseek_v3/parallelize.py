"""Apply parallelism to a DeepSeek-V3 model without touching its code (torchtitan style).

Expert parallelism: every MoE layer (MTP blocks included) keeps its router whole and replicated,
shards its routed experts over the EP group, and swaps its local dispatcher for an all-to-all one.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from moetron.comm.traffic import TrafficCounter
from moetron.models.deepseek_v3.moe import MoE
from moetron.parallel.dims import ParallelGroups
from moetron.parallel.expert_parallel import make_dispatcher, shard_experts


def parallelize(model: nn.Module, groups: ParallelGroups, dispatcher: str = "hierarchical",
                traffic: Optional[TrafficCounter] = None) -> nn.Module:
    dims = groups.dims
    if dims.ep > 1:
        traffic = traffic or TrafficCounter()
        for module in model.modules():
            if isinstance(module, MoE):
                shard_experts(module.experts, groups.ep_rank, dims.ep)
                module.dispatcher = make_dispatcher(dispatcher, model.cfg.n_routed_experts, groups, traffic)
        model.traffic = traffic
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters sharded over EP (their gradients reduce over the expert-data-parallel group)."""
    return [p for m in model.modules() if getattr(m, "is_expert_parallel", False) for p in m.parameters()]
