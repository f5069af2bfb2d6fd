"""One step finalizer: what happens between the last backward and the optimizer step (in the spirit
of Megatron-Core's `finalize_model_grads`): gradient reduction, pipeline-shared sums, the whole
model's norm and clipping.

It owns the split of this rank's parameters, each part with one gradient buffer
(`moetron.parallel.grad_buffer.GradBuffer`):
- *replicated* (attention, dense layers, shared experts, routers, embedding, head): copies on every
  dp x ep x cp rank of a pipeline stage; gradients averaged over that group;
- *expert* (routed experts, sharded over EP groups of ep x cp ranks): copies on the expert-data-
  parallel ranks (dp); an EP rank's experts already received every EP peer's tokens' gradients
  through the all-to-all, so their gradients sum over the expert-data-parallel group, divided by
  dp x ep x cp all the same;
- *pipeline-shared* (DualPipe's mirrored stages, an embedding the loss tail reads on another rank):
  held by several pipeline ranks, whose reduced gradients are then summed over those ranks.

With `zero1` (`moetron.parallel.zero1`), the optimizer steps on FP32 master shards instead of the
parameters: replicated parameters are sharded over the dp x ep x cp group, expert parameters over the
expert-data-parallel group; the buffers reduce-scatter instead of all-reducing, the norm is summed
from the shards, and the updated shards are all-gathered back into the parameters.

Working weights in a lower precision (`param_dtype` BF16, as DeepSeek-V3 computes with BF16 weights
and keeps float32 master weights, weight gradients and optimizer states: report section 3.3): the
master weights are taken from the float32 parameters before these are cast, and kept as ZeRO-1's
shards (without ZeRO-1: whole, on every rank); the gradients accumulate and reduce in float32
(`p.main_grad`), and each step's updated masters are copied (gathered) back into the parameters.

With `overlap_grad_reduce`, the micro-batch runner says when gradients become final
(`expect_final` before the action that adds a parameter's last gradient, `mark_final` after it),
and each bucket's collective starts while the backward goes on; `finish_gradients()` then waits.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from moetron.parallel.dims import ParallelGroups, pipeline_subgroups
from moetron.parallel.grad_buffer import BUCKET_NUMEL, GradBuffer, accumulated_grad
from moetron.parallel.grad_reduce import clip_by_global_norm, squared_norm, sum_shared_gradients
from moetron.parallel.materialize import cast_parameters, held_parameters
from moetron.parallel.zero1 import ShardedParams


class StepFinalizer:
    def __init__(self, model: nn.Module, expert_params: list, groups: ParallelGroups, grad_clip: float,
                 pp_holders: Optional[dict] = None, pp_shared: Optional[dict] = None, zero1: bool = False,
                 overlap_param_gather: bool = False, overlap_grad_reduce: bool = False,
                 grad_order: Optional[list] = None, bucket_numel: int = BUCKET_NUMEL,
                 param_dtype: torch.dtype = torch.float32) -> None:
        """`expert_params`: the EP-sharded parameters (from `parallelize`); `pp_holders`: id(param) ->
        the pipeline ranks holding it, and `pp_shared`: pipeline-rank set -> this rank's parameters
        they share (both from the pipeline split; None without pipelining). Every rank must build
        one: the pipeline-shared sets get process groups of their own. `overlap_param_gather`
        (ZeRO-1): the updated shards are gathered while the next step starts, each module's forward
        waiting for its own parameters; call `finish_gather()` before reading them elsewhere.
        `overlap_grad_reduce`: buckets start as their gradients become final (`expect_final`,
        `mark_final`). `grad_order`: the parameters in the order their gradients become final (the
        buckets follow it; None: reversed model order, as one backward finishes them). `param_dtype`:
        the working weights' dtype; the parameters (float32 when this is built) are cast to it."""
        expert_ids = {id(p) for p in expert_params}
        held = [p for p in held_parameters(model) if p.requires_grad]
        position = {id(p): i for i, p in enumerate(grad_order if grad_order is not None else reversed(held))}
        final_order = sorted(held, key=lambda p: position.get(id(p), len(position)))
        # in model order (the norm sums its squares in this order, whatever order the buckets take)
        self.experts = [p for p in held if id(p) in expert_ids]
        self.replicated = [p for p in held if id(p) not in expert_ids]
        self.groups, self.grad_clip, self.zero1 = groups, grad_clip, zero1
        self.pp_copies = {pid: len(ranks) for pid, ranks in (pp_holders or {}).items()}
        self.pp_shared = pp_shared or {}
        shared_sets = sorted({ranks for ranks in (pp_holders or {}).values() if len(ranks) > 1})
        self._shared_groups = (pipeline_subgroups(groups.dims, groups.rank, shared_sets, groups.timeout)
                               if shared_sets else {})
        dims, at = groups.dims, groups.dims.coords(groups.rank)
        self.overlap_reduce = overlap_grad_reduce
        # (parameters, the group holding copies of them, its size, this rank's place in it)
        parts = [(self.replicated, groups.dp_ep_group, dims.stage_ranks, groups.stage_rank),
                 (self.experts, groups.edp_group, dims.dp, at.dp)]
        self.sharded: list[ShardedParams] = []  # the master weights, in model order (checkpoints list them so)
        if zero1 or param_dtype != torch.float32:
            self.sharded = [ShardedParams(params, group, size, rank) if zero1 else ShardedParams(params, None, 1, 0)
                            for params, group, size, rank in parts]
        cast_parameters(held, param_dtype)
        self.buffers = [GradBuffer([p for p in final_order if (id(p) in expert_ids) == (params is self.experts)],
                                   group, size, rank, zero1, bucket_numel, overlap_grad_reduce, grad_dtype=torch.float32)
                        for params, group, size, rank in parts]
        for buffer in self.buffers:
            buffer.attach()
        self._shard_of = {id(p): shard for sp in self.sharded for p, shard in zip(sp.params, sp.shards)}
        # what the optimizer steps on, and the gradient it reads: the parameter, or its master (shard)
        self._reduced = {}  # id(param) -> its reduced gradient (the accumulated one, or its shard's)
        for buffer in self.buffers:
            for i, p in enumerate(buffer.params):
                self._reduced[id(p)] = buffer.shard_grads[i] if zero1 else accumulated_grad(p)
                if self.sharded:
                    self._shard_of[id(p)].grad = self._reduced[id(p)]
        self.overlap_gather = zero1 and overlap_param_gather
        for sharded in self.sharded if self.overlap_gather else []:
            sharded.wait_before_forward(model)

    def stepped_on(self, p: nn.Parameter) -> torch.Tensor:
        """What the optimizer steps on for parameter `p`: itself, or under ZeRO-1 its master shard."""
        return self._shard_of.get(id(p), p)

    # -- when gradients are final (overlap_grad_reduce) ---------------------------------------------
    def expect_final(self, params: Iterable[torch.Tensor]) -> None:
        """The next gradient each of `params` receives is its last of the step."""
        params = list(params)
        for buffer in self.buffers:
            buffer.expect_final(params)

    def mark_final(self, params: Iterable[torch.Tensor]) -> None:
        """`params` have all of their step's gradients."""
        params = list(params)
        for buffer in self.buffers:
            buffer.mark_final(params)

    def grad_accumulated(self, p: torch.Tensor) -> None:
        """A gradient was added to p.grad outside autograd (a pipeline's W action)."""
        for buffer in self.buffers:
            if buffer.holds(p):
                buffer.grad_accumulated(p)

    # -- the step ----------------------------------------------------------------------------------
    def finish_gradients(self) -> float:
        """Average over data- and expert-data-parallel ranks (cp ranks as data ranks), sum over pipeline ranks sharing a
        parameter, clip by the whole model's norm (optim.grad_clip; 0: no clipping); return the norm."""
        g = self.groups
        for buffer in self.buffers:
            buffer.finish(1.0 / self.groups.dims.stage_ranks)
        if self.pp_shared:  # averaging and summing commute: the pipeline's copies sum what their groups reduced
            reduced = {pp_set: [self._reduced[id(p)] for p in params] for pp_set, params in self.pp_shared.items()}
            sum_shared_gradients(reduced, self._shared_groups)
        device = next((p.device for p in [*self.replicated, *self.experts]), torch.device("cpu"))
        squares = []
        for params, group in ((self.replicated, g.dp_ep_group), (self.experts, g.edp_group)):
            square = squared_norm([(self._reduced[id(p)], self.pp_copies.get(id(p), 1)) for p in params], device)
            if self.zero1 and group is not None:  # each rank holds its rows: the norm sums them
                dist.all_reduce(square, group=group)
            squares.append(square)
        return clip_by_global_norm(*squares, [g for buffer in self.buffers for g in buffer.reduced], self.grad_clip,
                                   g.ep_group, g.pp_group)

    def after_optimizer_step(self, gather: bool = True) -> None:
        """ZeRO-1: the updated master shards back into every rank's parameters (`gather=False`: the
        step was skipped, nothing changed). Then the gradients are zeroed for the next step."""
        for sharded in self.sharded if gather else []:
            sharded.all_gather_params(async_op=self.overlap_gather)
        for buffer in self.buffers:
            buffer.zero_()

    def finish_gather(self) -> None:
        """ZeRO-1 with overlap_param_gather: every parameter updated (before a checkpoint, or the end)."""
        for sharded in self.sharded:
            sharded.finish_gather()

    def params_from_masters(self) -> None:
        """After a checkpoint loaded into the master weights (`moetron.parallel.row_shards.model_state`
        saves and loads them in place of their parameters): the parameters follow."""
        for sharded in self.sharded:
            sharded.all_gather_params()
