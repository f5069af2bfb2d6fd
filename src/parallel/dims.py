"""Parallel dimensions, cluster topology, rank placement and the process groups that fall out of them.

world = pp x dp x ep x cp ranks, laid out as the grid `arange(world).view(pp, dp, ep, cp)`. Within
a pipeline stage, attention and dense layers are data-parallel over all its dp x ep x cp ranks (the
"dp_ep" group: each has its own tokens): the dp x ep data ranks read their own sequences, and the cp
ranks of a context-parallel group (consecutive ranks, so on one node whenever cp divides the GPUs
per node) share theirs, each holding 2 of every row's 2 x cp chunks
(moetron.models.common.context_parallel).

Routed experts are sharded over an EP group of ep x cp consecutive ranks and replicated over dp
(the "edp" group): the experts fold over the context-parallel ranks, as Megatron-Core's MoE
parallel folding does (an expert sees tokens, not sequences), so that a long sequence's cp ranks
add expert parallelism rather than copies of every expert. With cp = 1 an EP group is ep
consecutive ranks; it stays inside a node whenever its size divides the GPUs per node (ranks fill
nodes in order). For the two-hop dispatch, an EP group spanning several nodes splits further into
`nvl` (its ranks on my node) and `ib` (its ranks with my local index on every node).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from moetron.comm.lanes import IssueOrder, LaneGroup


@dataclass(frozen=True)
class Topology:
    nodes: int
    gpus_per_node: int  # ranks per node (virtual nodes on a CPU)
    nvlink_gbps: float = 0.0
    ib_gbps: float = 0.0
    peak_tflops: float = 1.0

    @classmethod
    def from_config(cls, cluster, world_size: int, env: Optional[dict] = None) -> "Topology":
        """The cluster config's topology; what it leaves unset (null) comes from the job: SLURM's
        SLURM_NNODES and SLURM_GPUS_ON_NODE, else torchrun's LOCAL_WORLD_SIZE (ranks per node)."""
        env = os.environ if env is None else env

        def from_env(name: str) -> Optional[int]:
            value = env.get(name, "")
            return int(value) if value.isdigit() and int(value) > 0 else None

        if cluster.nodes:  # set in the config (virtual nodes on a CPU too): the ranks split evenly
            nodes = cluster.nodes
            per_node = cluster.gpus_per_node or max(world_size // nodes, 1)
        else:  # from the job
            local = from_env("LOCAL_WORLD_SIZE")
            nodes = from_env("SLURM_NNODES") or (max(world_size // local, 1) if local else 1)
            per_node = cluster.gpus_per_node or from_env("SLURM_GPUS_ON_NODE") or local or max(world_size // nodes, 1)
        return cls(nodes, per_node, cluster.nvlink_gbps, cluster.ib_gbps, cluster.peak_tflops)

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node


class Coords(NamedTuple):  # in the grid's order
    pp: int
    dp: int
    ep: int
    cp: int


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp: int
    ep: int
    cp: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.ep

    @property
    def data_ranks(self) -> int:
        """Ranks of a pipeline stage that read their own sequences (dp x ep; cp ranks share theirs)."""
        return self.dp * self.ep

    @property
    def stage_ranks(self) -> int:
        """Ranks of a pipeline stage, each with its own tokens (dp x ep x cp): they average gradients."""
        return self.dp * self.cp * self.ep

    @property
    def expert_ranks(self) -> int:
        """Ranks of an EP group, over which the routed experts are sharded (ep x cp)."""
        return self.ep * self.cp

    def grid(self) -> torch.Tensor:
        return torch.arange(self.world_size).view(self.pp, self.dp, self.ep, self.cp)

    def coords(self, rank: int) -> Coords:
        """(pp, dp, ep, cp) index of a rank."""
        pp_idx, rest = divmod(rank, self.stage_ranks)
        dp_idx, rest = divmod(rest, self.expert_ranks)
        ep_idx, cp_idx = divmod(rest, self.cp)
        return Coords(pp_idx, dp_idx, ep_idx, cp_idx)

    def problems(self, world_size: int, topology: Topology) -> list[str]:
        """What is inconsistent, each naming the key and the fix (empty when all is well)."""
        out = []
        if self.world_size != world_size:
            keys = ("pp", "dp", "ep", "cp") if self.cp > 1 else ("pp", "dp", "ep")
            product = "*".join(f"parallel.{k}" for k in keys)
            sizes = "*".join(str(getattr(self, k)) for k in keys)
            out.append(f"world size {world_size} != {product} = {sizes}: launch {self.world_size} ranks or change "
                       "parallel.dp")
        if topology.nodes * topology.gpus_per_node != world_size:
            out.append(f"cluster.nodes x cluster.gpus_per_node = {topology.nodes} x {topology.gpus_per_node} != "
                       f"world size {world_size}: describe the ranks you launch")
        per_node, size = topology.gpus_per_node, self.expert_ranks
        what = f"parallel.ep={self.ep}" if self.cp == 1 else f"an EP group of parallel.ep x parallel.cp = {size} ranks"
        if size > per_node and size % per_node:
            out.append(f"{what} spans nodes of {per_node} ranks unevenly: use a multiple of "
                       f"cluster.gpus_per_node={per_node}")
        if size < per_node and per_node % size:
            out.append(f"{what} does not divide cluster.gpus_per_node={per_node}: an EP group "
                       "would straddle a node boundary")
        return out

    def ep_nodes(self, topology: Topology) -> int:
        """Nodes one EP group spans."""
        return max(self.expert_ranks // topology.gpus_per_node, 1)

    def placement(self, topology: Topology) -> str:
        """A table of where every rank sits, printed at start."""
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        lines = [f"placement: pp={self.pp} dp={self.dp} ep={self.ep}{cp} on {topology.nodes} node(s) x "
                 f"{topology.gpus_per_node} rank(s); EP groups span {self.ep_nodes(topology)} node(s)"]
        if self.cp > 1:
            nodes = len({topology.node_of(r) for r in self.grid()[0, 0, 0, :].tolist()})
            lines[0] += (f"; cp groups span {nodes} node(s); experts sharded over EP groups of ep x cp = "
                         f"{self.expert_ranks} ranks")
        for rank in range(self.world_size):
            at = self.coords(rank)
            cp_idx = f" cp {at.cp}" if self.cp > 1 else ""
            lines.append(f"  rank {rank:4d}: node {topology.node_of(rank):3d} local {rank % topology.gpus_per_node:2d}"
                         f" | pp {at.pp} dp {at.dp} ep {at.ep}{cp_idx}")
        return "\n".join(lines)


@dataclass
class ParallelGroups:
    """This rank's process groups (None where the group is this rank alone) and its coordinates."""

    dims: ParallelDims
    topology: Topology
    rank: int
    ep_group: Optional[dist.ProcessGroup]
    edp_group: Optional[dist.ProcessGroup]  # same experts, other dp replicas
    dp_ep_group: Optional[dist.ProcessGroup]  # all dp x ep x cp ranks of my pipeline stage (each has its own tokens)
    nvl_group: Optional[dist.ProcessGroup]  # my EP group's ranks on my node
    ib_group: Optional[dist.ProcessGroup]  # my EP group's ranks with my local index, one per node
    pp_group: Optional[dist.ProcessGroup] = None  # my pipeline: the pp ranks with my dp, cp and ep index
    cp_group: Optional[dist.ProcessGroup] = None  # the ranks holding the other chunks of my sequences
    extra_lanes: list = field(default_factory=list)  # lanes 1..: {"ep", "nvl", "ib", "pp", "cp": copy} (comm.lanes)
    order: Optional[IssueOrder] = None  # lanes take turns issuing during F&B pairs (comm.lanes)
    timeout: Optional[timedelta] = None  # how long a collective of these groups waits on a peer
    members: dict = field(default_factory=dict)  # group name ("ep", "edp", "dp_ep", "pp", ...) -> my group's ranks

    @property
    def pp_rank(self) -> int:
        return self.dims.coords(self.rank).pp

    @property
    def ep_rank(self) -> int:
        """My place in my EP group (its ep x cp ranks)."""
        return self.rank % self.dims.expert_ranks

    @property
    def cp_rank(self) -> int:
        return self.dims.coords(self.rank).cp

    @property
    def data_rank(self) -> int:
        """Index among the dp x ep ranks of my pipeline stage that read their own sequences (the
        ranks of a cp group read the same ones)."""
        at = self.dims.coords(self.rank)
        return at.dp * self.dims.ep + at.ep

    @property
    def stage_rank(self) -> int:
        """Index among all dp x cp x ep ranks of my pipeline stage: my place in the dp_ep group."""
        return self.rank % self.dims.stage_ranks

    @property
    def ep_ranks_per_node(self) -> int:
        return min(self.dims.expert_ranks, self.topology.gpus_per_node)

    def describe(self, names: list[str]) -> str:
        """My groups among `names` that have peers, for messages: "dp_ep group [0, 1, 2, 3], ..."."""
        found = [f"{name} group {self.members[name]}" for name in names if len(self.members.get(name, [])) > 1]
        return ", ".join(found) or "no group of several ranks"

    def lanes(self, name: str) -> LaneGroup:
        """Group `name` ("ep", "nvl", "ib", "pp" or "cp") with one copy per lane (see moetron.comm.lanes)."""
        return LaneGroup([getattr(self, f"{name}_group"), *(lane[name] for lane in self.extra_lanes)], self.order)


def _make_groups(rank_lists: list[list[int]], rank: int, timeout: Optional[timedelta] = None, name: str = ""
                 ) -> Optional[dist.ProcessGroup]:
    """Create every group of a partition (all ranks must call this alike); return the one holding rank.
    `timeout`: how long a collective waits on a peer (new groups do not inherit the world's); `name`
    goes into each group's description (NCCL's timeout reports name it)."""
    mine = None
    for ranks in rank_lists:
        desc = f"{name}{ranks}"
        group = dist.new_group(ranks, timeout=timeout, group_desc=desc) if len(ranks) > 1 else None
        if rank in ranks:
            mine = group
    return mine


def build_groups(dims: ParallelDims, topology: Topology, rank: int, lanes: int = 1,
                 ordered: bool = False, timeout: Optional[timedelta] = None) -> ParallelGroups:
    """All process groups, from the rank grid; call on every rank after init_process_group. `lanes` > 1
    adds copies of the ep, nvl, ib, pp and cp groups, so a backward can communicate while a forward does;
    `ordered` makes the lanes take turns issuing while both are busy (NCCL needs it); `timeout`: how
    long their collectives wait on a peer (train.collective_timeout_s)."""
    grid = dims.grid()  # [pp, dp, ep, cp]

    def make(lists, name):
        return _make_groups(lists, rank, timeout, name)

    size = dims.expert_ranks
    ep_lists = grid.reshape(-1, size).tolist()
    edp_lists = grid.permute(0, 2, 3, 1).reshape(-1, dims.dp).tolist()
    dp_ep_lists = grid.reshape(dims.pp, -1).tolist()
    per_node = min(size, topology.gpus_per_node)
    nvl_lists = [ep[i:i + per_node] for ep in ep_lists for i in range(0, size, per_node)]
    ib_lists = [ep[local::per_node] for ep in ep_lists for local in range(per_node)]
    pp_lists = grid.permute(1, 2, 3, 0).reshape(-1, dims.pp).tolist()
    cp_lists = grid.reshape(-1, dims.cp).tolist()
    partitions = {"ep": ep_lists, "edp": edp_lists, "dp_ep": dp_ep_lists, "nvl": nvl_lists, "ib": ib_lists,
                  "pp": pp_lists, "cp": cp_lists}
    made = {f"{name}_group": make(lists, name) for name, lists in partitions.items()}
    members = {name: next(r for r in lists if rank in r) for name, lists in partitions.items()}
    members["world"] = list(range(dims.world_size))
    groups = ParallelGroups(dims, topology, rank, **made, timeout=timeout, members=members)
    copied = {"ep": ep_lists, "nvl": nvl_lists, "ib": ib_lists, "pp": pp_lists, "cp": cp_lists}
    groups.order = IssueOrder() if ordered and lanes > 1 else None
    for lane in range(1, lanes):
        groups.extra_lanes.append({name: make(lists, f"{name}-lane{lane}") for name, lists in copied.items()})
    return groups


def data_parallel_copy(groups: "ParallelGroups", name: str = "balance") -> Optional[dist.ProcessGroup]:
    """A group of my dp x cp x ep ranks (the "dp_ep" partition) of its own, for collectives that must keep
    their own order (a forward's, while a backward reduces gradients on dp_ep); every rank calls it
    alike. None where the group would be this rank alone."""
    dims = groups.dims
    return _make_groups(dims.grid().reshape(dims.pp, -1).tolist(), groups.rank, groups.timeout, name)


def pipeline_subgroups(dims: ParallelDims, rank: int, pp_sets: list[tuple[int, ...]],
                       timeout: Optional[timedelta] = None) -> dict:
    """For each set of pp indices, the group of those pipeline ranks in my (dp, ep, cp) column (every
    rank creates all of them, in the same order). Returns {pp set: group} for the sets I belong to."""
    columns = dims.grid().reshape(dims.pp, -1)
    mine = {}
    for pp_set in pp_sets:
        lists = [[int(columns[q, c]) for q in pp_set] for c in range(columns.shape[1])]
        group = _make_groups(lists, rank, timeout, f"pp-shared{list(pp_set)}")
        if dims.coords(rank).pp in pp_set:
            mine[pp_set] = group
    return mine
