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
norm). `reduce_metrics(parts)` sums a dict of float64 device tensors over all ranks in one
all-reduce. ZeRO-1 will replace the data-parallel all-reduce here by a reduce-scatter.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moetron.parallel.dims import ParallelGroups, pipeline_subgroups
from moetron.parallel.grad_reduce import clip_grad_norm, reduce_gradients, sum_shared_gradients
from moetron.parallel.materialize import held_parameters


class StepFinalizer:
    def __init__(self, model: nn.Module, expert_params: list, groups: ParallelGroups, grad_clip: float,
                 pp_holders: Optional[dict] = None, pp_shared: Optional[dict] = None) -> None:
        """`expert_params`: the EP-sharded parameters (from `parallelize`); `pp_holders`: id(param) ->
        the pipeline ranks holding it, and `pp_shared`: pipeline-rank set -> this rank's parameters
        they share (both from the pipeline split; None without pipelining). Every rank must build
        one: the pipeline-shared sets get process groups of their own."""
        expert_ids = {id(p) for p in expert_params}
        self.experts = [p for p in expert_params if not p.is_meta]
        self.replicated = [p for p in held_parameters(model) if p.requires_grad and id(p) not in expert_ids]
        self.groups, self.grad_clip = groups, grad_clip
        self.pp_copies = {pid: len(ranks) for pid, ranks in (pp_holders or {}).items()}
        self.pp_shared = pp_shared or {}
        shared_sets = sorted({ranks for ranks in (pp_holders or {}).values() if len(ranks) > 1})
        self._shared_groups = pipeline_subgroups(groups.dims, groups.rank, shared_sets) if shared_sets else {}

    @property
    def data_ranks(self) -> int:
        """Ranks of a pipeline stage that read their own sequences (dp x ep)."""
        return self.groups.dims.dp * self.groups.dims.ep

    def finish_gradients(self) -> float:
        """Average over data- and expert-data-parallel ranks, sum over pipeline ranks sharing a
        parameter, clip by the whole model's norm (optim.grad_clip; 0: no clipping); return the norm."""
        g = self.groups
        reduce_gradients(self.replicated, self.experts, g.dp_ep_group, g.edp_group, self.data_ranks)
        if self.pp_shared:
            sum_shared_gradients(self.pp_shared, self._shared_groups)
        return clip_grad_norm(self.replicated, self.experts, self.grad_clip, g.ep_group, g.pp_group, self.pp_copies)

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
