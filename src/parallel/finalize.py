"""One step finalizer: what happens between the last backward and the optimizer step, and the one
packed reduction of the step's metrics (in the spirit of Megatron-Core's `finalize_model_grads`).

It owns the split of this rank's parameters:
- *replicated* (attention, dense layers, shared experts, routers, embedding, head): copies on every
  dp x ep rank of a pipeline stage; gradients averaged over that group;
- *expert* (routed experts, sharded over EP): copies on the expert-data-parallel ranks; an EP rank's
  experts already received every EP peer's tokens' gradients through the all-to-all, so their
  gradients average over the expert-data-parallel group, divided by dp x ep all the same;
- *pipeline-shared* (DualPipe's mirrored stages, an embedding the loss tail reads on another rank):
  held by several pipeline ranks, whose gradients are summed over those ranks.

`finish_gradients()` reduces, sums, computes the whole model's gradient norm and clips (returns the
norm); `optimizer_param_groups` gives the optimizer what it steps on, `after_optimizer_step()`
finishes the step. `reduce_metrics(parts)` sums a dict of float64 device tensors over all ranks in
one all-reduce.

With `zero1` (`moetron.parallel.zero1`), the optimizer steps on FP32 master shards instead of the
parameters: replicated parameters are sharded over the dp x ep group, expert parameters over the
expert-data-parallel group; gradients are reduce-scattered instead of all-reduced, the norm is
summed from the shards, and the updated shards are all-gathered back into the parameters.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moetron.parallel.dims import ParallelGroups, pipeline_subgroups
from moetron.parallel.grad_reduce import (clip_by_global_norm, clip_grad_norm, reduce_gradients, squared_norm,
                                          sum_shared_gradients)
from moetron.parallel.materialize import held_parameters
from moetron.parallel.zero1 import ShardedParams


class StepFinalizer:
    def __init__(self, model: nn.Module, expert_params: list, groups: ParallelGroups, grad_clip: float,
                 pp_holders: Optional[dict] = None, pp_shared: Optional[dict] = None, zero1: bool = False,
                 overlap_param_gather: bool = False, overlap_grad_reduce: bool = False) -> None:
        """`expert_params`: the EP-sharded parameters (from `parallelize`); `pp_holders`: id(param) ->
        the pipeline ranks holding it, and `pp_shared`: pipeline-rank set -> this rank's parameters
        they share (both from the pipeline split; None without pipelining). Every rank must build
        one: the pipeline-shared sets get process groups of their own. `overlap_param_gather`
        (ZeRO-1): the updated shards are gathered while the next step starts, each module's forward
        waiting for its own parameters; call `finish_gather()` before reading them elsewhere.
        `overlap_grad_reduce` (ZeRO-1): after `arm_reduce()`, the next backward starts each bucket's
        reduce-scatter as soon as its gradients are final (call it before the step's last backward)."""
        expert_ids = {id(p) for p in expert_params}
        self.experts = [p for p in expert_params if not p.is_meta]
        self.replicated = [p for p in held_parameters(model) if p.requires_grad and id(p) not in expert_ids]
        self.groups, self.grad_clip = groups, grad_clip
        self.pp_copies = {pid: len(ranks) for pid, ranks in (pp_holders or {}).items()}
        self.pp_shared = pp_shared or {}
        shared_sets = sorted({ranks for ranks in (pp_holders or {}).values() if len(ranks) > 1})
        self._shared_groups = (pipeline_subgroups(groups.dims, groups.rank, shared_sets, groups.timeout)
                               if shared_sets else {})
        self.model, self.zero1 = model, zero1
        self.sharded: list[ShardedParams] = []
        if zero1:
            dims, (_, dp_idx, _) = groups.dims, groups.dims.coords(groups.rank)
            self.sharded = [ShardedParams(self.replicated, groups.dp_ep_group, self.data_ranks, groups.dp_ep_rank),
                            ShardedParams(self.experts, groups.edp_group, dims.dp, dp_idx)]
        self._shard_of = {id(p): shard for sp in self.sharded for p, shard in zip(sp.params, sp.shards)}
        self.overlap_gather = zero1 and overlap_param_gather
        for sharded in self.sharded if self.overlap_gather else []:
            sharded.wait_before_forward(model)
        self.overlap_reduce = zero1 and overlap_grad_reduce
        for sharded in self.sharded if self.overlap_reduce else []:
            sharded.overlap_reduce_with_backward()

    def arm_reduce(self) -> None:
        """The next backward is the step's last (overlap_grad_reduce; otherwise nothing happens)."""
        for sharded in self.sharded if self.overlap_reduce else []:
            sharded.arm_reduce()

    @property
    def data_ranks(self) -> int:
        """Ranks of a pipeline stage that read their own sequences (dp x ep)."""
        return self.groups.dims.dp * self.groups.dims.ep

    def optimizer_param_groups(self, weight_decay: float) -> list[dict]:
        """What the optimizer steps on, in model order: the held parameters, or under ZeRO-1 their
        master shards. Weight decay on matrices and expert stacks, none on norms and vectors."""
        held = [p for p in held_parameters(self.model) if p.requires_grad]
        decay = [self._shard_of.get(id(p), p) for p in held if p.ndim >= 2]
        no_decay = [self._shard_of.get(id(p), p) for p in held if p.ndim < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def finish_gradients(self) -> float:
        """Average over data- and expert-data-parallel ranks, sum over pipeline ranks sharing a
        parameter, clip by the whole model's norm (optim.grad_clip; 0: no clipping); return the norm."""
        g = self.groups
        if not self.zero1:
            reduce_gradients(self.replicated, self.experts, g.dp_ep_group, g.edp_group, self.data_ranks)
            if self.pp_shared:
                sum_shared_gradients(self.pp_shared, self._shared_groups)
            return clip_grad_norm(self.replicated, self.experts, self.grad_clip, g.ep_group, g.pp_group,
                                  self.pp_copies)
        if self.pp_shared:  # full gradients first: the pipeline ranks sharing a parameter shard it alike
            sum_shared_gradients(self.pp_shared, self._shared_groups)
        replicated, experts = self.sharded
        for sharded in self.sharded:
            sharded.reduce_scatter_grads(1.0 / self.data_ranks)
        return self._clip_shards(replicated, experts)

    def _clip_shards(self, replicated: ShardedParams, experts: ShardedParams) -> float:
        """The whole model's norm from the shards: replicated shards summed over dp x ep, expert
        shards over expert-DP (then, as without ZeRO, EP and the pipeline); clip the shard gradients."""
        g = self.groups
        device = next((p.device for p in [*self.replicated, *self.experts]), torch.device("cpu"))
        squares = []
        for sharded, group in ((replicated, g.dp_ep_group), (experts, g.edp_group)):
            square = squared_norm([(s.grad, self.pp_copies.get(id(p), 1))
                                   for p, s in zip(sharded.params, sharded.shards)], device)
            if group is not None:
                dist.all_reduce(square, group=group)
            squares.append(square)
        grads = [s.grad for sp in self.sharded for s in sp.shards]
        return clip_by_global_norm(*squares, grads, self.grad_clip, g.ep_group, g.pp_group)

    def after_optimizer_step(self, gather: bool = True) -> None:
        """ZeRO-1: the updated master shards back into every rank's parameters (`gather=False`: the
        step was skipped, nothing changed). Then no gradients."""
        for sharded in self.sharded if gather else []:
            sharded.all_gather_params(async_op=self.overlap_gather)
        for p in held_parameters(self.model):
            p.grad = None
        for shard in self._shard_of.values():
            shard.grad = None

    def finish_gather(self) -> None:
        """ZeRO-1 with overlap_param_gather: every parameter updated (before a checkpoint, or the end)."""
        for sharded in self.sharded:
            sharded.finish_gather()

    def load_shards_from_params(self) -> None:
        """After a checkpoint loaded into the parameters: the master shards follow."""
        for sharded in self.sharded:
            sharded.load_shards_from_params()

    def reduce_metrics(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each tensor summed over all ranks, in one all-reduce (float64, on the device the tensors are
        on: NCCL reduces device tensors); returned on the host. Every rank passes the same keys and
        shapes."""
        if not parts:
            return {}
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in parts.values()])
        if self.groups.dims.world_size > 1:
            dist.all_reduce(flat)
        flat = flat.cpu()  # the step's one host sync for its metrics
        out, offset = {}, 0
        for name, t in parts.items():
            out[name] = flat[offset:offset + t.numel()].view(t.shape)
            offset += t.numel()
        return out
