"""Expert parallelism: shard a grouped-expert module over the EP group and build its dispatcher."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moetron.comm.dispatch import AllToAllDispatcher, HierarchicalDispatcher
from moetron.comm.traffic import TrafficCounter
from moetron.parallel.dims import ParallelGroups

DISPATCHERS = ("alltoall", "hierarchical", "deepep")


def make_dispatcher(name: str, num_experts: int, groups: ParallelGroups, traffic: Optional[TrafficCounter] = None):
    """The dispatcher `parallel.dispatcher` names, for this rank's EP group."""
    dims, topo = groups.dims, groups.topology
    ep_rank = groups.ep_rank
    ep_group, nvl_group, ib_group = groups.lanes("ep"), groups.lanes("nvl"), groups.lanes("ib")
    if name == "alltoall":
        first_rank = groups.rank - ep_rank
        nodes = [topo.node_of(first_rank + e) for e in range(dims.ep)]
        return AllToAllDispatcher(num_experts, ep_rank, dims.ep, ep_group, nodes, traffic=traffic)
    if name == "hierarchical":
        return HierarchicalDispatcher(num_experts, ep_rank, dims.ep, groups.ep_ranks_per_node, ib_group, nvl_group,
                                      traffic=traffic)
    if name == "deepep":
        try:
            import deep_ep  # noqa: F401
        except ImportError as err:
            raise ImportError("parallel.dispatcher=deepep needs DeepEP (github.com/deepseek-ai/DeepEP) built on a "
                              "CUDA machine; use parallel.dispatcher=hierarchical or alltoall") from err
        raise NotImplementedError("the DeepEP backend is not wired in yet; use parallel.dispatcher=hierarchical")
    raise ValueError(f"parallel.dispatcher={name!r}: choose one of {DISPATCHERS}")


@torch.no_grad()
def shard_experts(experts: nn.Module, ep_rank: int, ep_size: int) -> None:
    """Keep only this rank's experts [ep_rank * L, (ep_rank + 1) * L) of every [E, ...] parameter."""
    for name, param in list(experts.named_parameters(recurse=False)):
        local = param.shape[0] // ep_size
        shard = param[ep_rank * local:(ep_rank + 1) * local].clone()
        setattr(experts, name, nn.Parameter(shard, requires_grad=param.requires_grad))
        experts.is_expert_parallel = True
        experts.first_expert = ep_rank * local
