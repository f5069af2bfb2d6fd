"""Expert parallelism: shard a grouped-expert module over the EP group and build its dispatcher."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moetron.comm.dispatch import AllToAllDispatcher, HierarchicalDispatcher
from moetron.comm.dispatch.deepep import DeepEPBuffers, DeepEPDispatcher
from moetron.comm.traffic import TrafficCounter
from moetron.parallel.dims import ParallelGroups

DISPATCHERS = ("alltoall", "hierarchical", "deepep")


def make_dispatcher(name: str, num_experts: int, groups: ParallelGroups, traffic: Optional[TrafficCounter] = None,
                    deepep_buffers: Optional[DeepEPBuffers] = None, codec=None):
    """The dispatcher `parallel.dispatcher` names, for this rank's EP group; `codec`: how token rows
    travel (moetron.comm.dispatch.hop.IdentityCodec's interface; None: as they are).

    DeepEP's buffers are large: pass one `DeepEPBuffers` for all the layers of a model.
    """
    dims, topo = groups.dims, groups.topology
    ep_rank = groups.ep_rank
    ep_group, nvl_group, ib_group = groups.lanes("ep"), groups.lanes("nvl"), groups.lanes("ib")
    if name == "alltoall":
        first_rank = groups.rank - ep_rank
        nodes = [topo.node_of(first_rank + e) for e in range(dims.expert_ranks)]
        return AllToAllDispatcher(num_experts, ep_rank, dims.expert_ranks, ep_group, nodes, traffic=traffic,
                                  codec=codec)
    if name == "hierarchical":
        return HierarchicalDispatcher(num_experts, ep_rank, dims.expert_ranks, groups.ep_ranks_per_node, ib_group,
                                      nvl_group, traffic=traffic, codec=codec)
    if name == "deepep":
        if codec is not None:
            raise ValueError("parallel.dispatcher=deepep does not take a codec (FP8 dispatch): set "
                             "precision.fp8_dispatch=false, or use the alltoall or hierarchical dispatcher")
        return DeepEPDispatcher(num_experts, ep_rank, dims.expert_ranks, deepep_buffers or DeepEPBuffers(ep_group),
                                groups.ep_ranks_per_node, traffic=traffic)
    raise ValueError(f"parallel.dispatcher={name!r}: choose one of {DISPATCHERS}")


@torch.no_grad()
def shard_experts(experts: nn.Module, ep_rank: int, ep_size: int) -> None:
    """Keep only this rank's experts [ep_rank * L, (ep_rank + 1) * L) of every [E, ...] parameter."""
    for name, param in list(experts.named_parameters(recurse=False)):
        experts.global_experts = param.shape[0]  # rows of the whole stack
        local = param.shape[0] // ep_size
        shard = param[ep_rank * local:(ep_rank + 1) * local].clone()
        setattr(experts, name, nn.Parameter(shard, requires_grad=param.requires_grad))
        experts.first_expert = ep_rank * local  # the module's own slot: global index of its expert 0
