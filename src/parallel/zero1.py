"""ZeRO-1 (Rajbhandari et al. 2020, "ZeRO", stage 1): optimizer state and FP32 master weights
sharded over the ranks that hold copies of a parameter.

Each parameter is cut along dim 0 into `size` even shards (dim 0 padded up to a multiple of
`size`), so a shard is addressable by (parameter name, shard index) whatever else the rank holds.
Rank i of the group keeps shard i of every parameter as an FP32 master copy, on which the optimizer
steps. One step:

1. the gradient buffer (`moetron.parallel.grad_buffer.GradBuffer`, sharded) reduce-scatters each
   rank's rows of every gradient into `shard.grad`;
2. the caller clips the shard gradients by the whole model's norm and steps the optimizer on the
   master shards (AdamW is elementwise: the shard update equals the slice of the full update);
3. `all_gather_params()`: the updated shards travel back into every rank's full parameter. With
   `async_op=True` the gathers run while the rank goes on (metrics, logging, the next step's data
   and the forward of earlier layers): each module's forward pre-hook waits for its own parameters'
   bucket only (`wait_before_forward`), as Megatron-Core's `overlap_param_gather` does.

The same class keeps the float32 master weights of BF16 working weights without ZeRO-1 (one
shard of the whole parameter: size 1, no group): the optimizer steps on them, and the gather is a
copy into the parameters, rounded to their dtype. Under ZeRO-1 the gathers travel in the
parameters' dtype (BF16 working weights: half the bytes of float32).

Shape legend: D0 a parameter's dim 0, R rows per shard (ceil(D0 / size)), N group size.
"""
from __future__ import annotations

import math
import threading
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moetron.comm.sequence import all_gather_single as _all_gather
from moetron.parallel.grad_buffer import BUCKET_NUMEL, split_buckets


class ShardedParams:
    """Parameters replicated over `group` (`size` ranks, this one `rank`), with this rank's master shards."""

    def __init__(self, params: list[nn.Parameter], group: Optional[dist.ProcessGroup], size: int, rank: int,
                 bucket_numel: int = BUCKET_NUMEL) -> None:
        self.params, self.group, self.size, self.rank = params, group, size, rank
        self.rows = [math.ceil(p.shape[0] / size) for p in params]  # R per parameter
        with torch.no_grad():
            self.shards = [nn.Parameter(self._padded(p.detach(), r)[rank * r:(rank + 1) * r].float().clone())
                           for p, r in zip(params, self.rows)]
        self.buckets = split_buckets([s.numel() * size for s in self.shards], bucket_numel)  # indices per gather
        self._bucket_of = {id(self.params[i]): b for b, bucket in enumerate(self.buckets) for i in bucket}
        self._pending: dict[int, tuple] = {}  # bucket -> (its gather's work or None, the gathered [N, C])
        self._landing = threading.Lock()  # DualPipe's F&B pairs run a forward on a second thread

    def _padded(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """t with dim 0 zero-padded to rows x size: [R N, ...]."""
        extra = rows * self.size - t.shape[0]
        if extra == 0:
            return t
        return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])

    @torch.no_grad()
    def all_gather_params(self, async_op: bool = False) -> None:
        """Every rank's full parameters from the group's updated master shards. `async_op`: start the
        gathers and return; each bucket lands in its parameters when `wait_for(param)` or
        `finish_gather()` asks for it (the next forward's pre-hooks do: `wait_before_forward`)."""
        self.finish_gather()
        for b, bucket in enumerate(self.buckets):
            mine_C = torch.cat([self.shards[i].detach().reshape(-1) for i in bucket]).to(self.params[bucket[0]].dtype)
            if self.group is None:
                self._pending[b] = (None, mine_C.view(1, -1))
                continue
            all_NC = torch.empty(self.size * mine_C.numel(), dtype=mine_C.dtype, device=mine_C.device)
            work = _all_gather(all_NC, mine_C, group=self.group, async_op=True)
            self._pending[b] = (work, all_NC.view(self.size, -1))
        if not async_op:
            self.finish_gather()

    @torch.no_grad()
    def _land(self, b: int) -> None:
        """Wait for bucket b's gather and copy it into its parameters (then it stops being pending:
        another thread's unlocked check in `wait_for` never sees it done before it is)."""
        work, all_NC = self._pending[b]
        if work is not None:
            work.wait()
        offset = 0
        for i in self.buckets[b]:
            p, r, n = self.params[i], self.rows[i], self.shards[i].numel()
            full = all_NC[:, offset:offset + n].reshape(r * self.size, *p.shape[1:])[:p.shape[0]]
            p.copy_(full)
            offset += n
        del self._pending[b]

    def wait_for(self, params) -> None:
        """Land the pending buckets that hold any of `params`."""
        if not self._pending:  # the common case once a step's first forward has landed everything it needs
            return
        with self._landing:
            for b in sorted({self._bucket_of[id(p)] for p in params if id(p) in self._bucket_of} & set(self._pending)):
                self._land(b)

    def finish_gather(self) -> None:
        """Land every pending bucket (before anything reads the parameters outside a forward)."""
        with self._landing:
            for b in sorted(self._pending):
                self._land(b)

    def wait_before_forward(self, model: nn.Module) -> list:
        """Forward pre-hooks on every module owning parameters of these buckets: a module's forward
        waits for its own parameters' gather only, so the gathers of later layers overlap the
        compute of earlier ones. Returns the hook handles."""
        handles = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in self._bucket_of]
            if own:
                handles.append(module.register_forward_pre_hook(lambda _m, _args, own=own: self.wait_for(own)))
        return handles
