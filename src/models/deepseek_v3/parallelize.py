"""Apply parallelism to a DeepSeek-V3 model without touching its code (torchtitan style).

Expert parallelism: every MoE layer (MTP blocks included) keeps its router whole and replicated,
shards its routed experts over the EP group, and swaps its local dispatcher for an all-to-all one.
Pipeline parallelism: `pipeline_parts` cuts the model into the schedule's stages and says which
pipeline ranks hold each parameter (several do for DualPipe's mirrored stages and for the embedding
the MTP tail reads). The trainer builds the model on the meta device and allocates only what its
rank holds (moetron.parallel.materialize).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from moetron.comm.dispatch.deepep import DeepEPBuffers
from moetron.comm.traffic import TrafficCounter
from moetron.models.deepseek_v3.moe import MoE
from moetron.models.deepseek_v3.stages import StageTail, build_stages, even_layout
from moetron.parallel.dims import ParallelGroups
from moetron.parallel.expert_parallel import make_dispatcher, shard_experts


def parallelize(model: nn.Module, groups: ParallelGroups, dispatcher: str = "hierarchical",
                traffic: Optional[TrafficCounter] = None) -> nn.Module:
    dims = groups.dims
    if dims.ep > 1:
        traffic = traffic or TrafficCounter()
        buffers = DeepEPBuffers(groups.lanes("ep")) if dispatcher == "deepep" else None  # one set for all layers
        for module in model.modules():
            if isinstance(module, MoE):
                shard_experts(module.experts, groups.ep_rank, dims.ep)
                module.dispatcher = make_dispatcher(dispatcher, model.cfg.n_routed_experts, groups, traffic, buffers)
        model.traffic = traffic
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters sharded over EP (their gradients reduce over the expert-data-parallel group)."""
    return [p for m in model.modules() if getattr(m, "is_expert_parallel", False) for p in m.parameters()]


@dataclass
class PipelineParts:
    stage_modules: dict  # stage id -> Stage run by this rank
    tail: Optional[StageTail]  # the loss, on ranks that run a chain's last stage
    holders: dict = field(default_factory=dict)  # id(param) -> pp ranks holding it
    shared: dict = field(default_factory=dict)  # pp ranks (>1) -> this rank's parameters they share


def num_stage_modules(schedule) -> int:
    """Distinct stage modules: DualPipe's two chains run the same modules in opposite directions."""
    return len(schedule.chains[0])


def pipeline_parts(model: nn.Module, schedule, pp_rank: int, layout: Optional[list] = None,
                   aux_scale: float = 1.0) -> PipelineParts:
    depth_of = {s: (s % schedule.num_ranks if schedule.name == "dualpipe" else s) for s in schedule.stage_rank}
    layout = layout or even_layout(model.cfg.num_hidden_layers, num_stage_modules(schedule))
    stages, tail = build_stages(model, layout, aux_scale)
    last_stages = {chain[-1] for chain in schedule.chains}

    def held_by(q: int) -> list[nn.Module]:
        mods: list[nn.Module] = [stages[depth_of[s]] for s, r in schedule.stage_rank.items() if r == q]
        return mods + ([tail] if any(schedule.stage_rank[s] == q for s in last_stages) else [])

    holders: dict = {}
    for q in range(schedule.num_ranks):
        for module in held_by(q):
            for p in module.parameters():
                holders.setdefault(id(p), set()).add(q)
    mine = {id(p) for m in held_by(pp_rank) for p in m.parameters()}
    shared: dict = {}
    for p in model.parameters():  # model order: every holder lists a shared set's parameters alike
        ranks = tuple(sorted(holders.get(id(p), ())))
        if id(p) in mine and len(ranks) > 1:
            shared.setdefault(ranks, []).append(p)
    stage_modules = {s: stages[depth_of[s]] for s, r in schedule.stage_rank.items() if r == pp_rank}
    has_tail = any(schedule.stage_rank[s] == pp_rank for s in last_stages)
    return PipelineParts(stage_modules, tail if has_tail else None,
                         {pid: tuple(sorted(r)) for pid, r in holders.items()}, shared)


def all_shared_sets(parts: PipelineParts) -> list[tuple[int, ...]]:
    """Every pp-rank set that shares a parameter (the same list on all ranks: it comes from the schedule)."""
    return sorted({ranks for ranks in parts.holders.values() if len(ranks) > 1})
