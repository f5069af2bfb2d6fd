"""One contiguous, bucketed gradient buffer per set of replicated parameters (as Megatron-Core's
`param_and_grad_buffer`), used by plain data parallelism and ZeRO-1 alike.

Every parameter's `.grad` is a view of one flat tensor, set once: autograd and the pipeline's
deferred weight gradients accumulate into it in place, and a step only zeroes it. Parameters kept in
a lower precision than the buffer (BF16 working weights, float32 gradients: DeepSeek-V3 report
section 3.3) get the view as `p.main_grad` instead (autograd wants `.grad` in the parameter's
dtype): each gradient autograd leaves in `.grad` is added to it and dropped (Megatron-Core's
`main_grad`); `accumulated_grad(p)` is the view either way. Micro-batches and ranks sum in float32;
one micro-batch's gradient arrives rounded to the parameter's dtype, as autograd (and a W action,
alike) delivers it (Megatron-Core's gradient-accumulation fusion writes the weight-gradient GEMM's
float32 output into `main_grad` instead: not done here).

The flat tensor is cut into buckets of consecutive parameters, in the order their gradients become
final (the backward finishes the last layers first); each bucket is one collective over the group:

- all-reduce (plain data parallelism): the bucket's slice of the buffer, in place;
- reduce-scatter (ZeRO-1): a parameter's dim 0 is padded to N x R rows (R = ceil(D0 / N)), and
  rank n receives the sum of rows [n R, (n + 1) R) of every parameter of the bucket in
  `shard_grads[i]`, the master shards' gradients: views of those rows of the buffer itself (after
  `finish` they hold the reduced rows, the other rows this rank's own sums). The collective wants
  each rank's rows together, so the bucket is packed rank-major before it is sent: the copy
  Megatron-Core avoids by sharding the flat buffer itself (we keep per-parameter row shards because
  checkpoints address optimizer state by a parameter's rows); at most MAX_PACKED_IN_FLIGHT packed
  buckets live at once.

Overlap (Megatron-Core's overlap_grad_reduce): `expect_final(params)` says that the next
accumulation of each of these parameters is its last of the step (the runner says so before the
step's last backward, or a pipeline stage's last backward / W action); the post-accumulate hook of
each parameter (or the weight-gradient store, for gradients a W action adds) then marks it final,
and a bucket's collective starts as soon as all of its parameters are final and every earlier
bucket has started: one issue order on every rank of the group. `mark_final(params)` marks them
final now (the action is over; a parameter that got no gradient adds zeros). `finish(scale)`
starts what has not started, waits for every bucket and scales. Without overlap, `finish` starts
and waits for every bucket; the arithmetic is the same either way, so the results are bitwise
equal.

Shape legend: N group size, R rows of a parameter's shard, C elements of a bucket's shard.
"""
from __future__ import annotations

import math
import threading
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from moetron.comm.sequence import reduce_scatter_single as _reduce_scatter

BUCKET_NUMEL = 1 << 24  # elements of one collective's buffer (64 MiB of float32), all ranks' rows
# ZeRO-1: reduce-scatters in flight at once, each holding its bucket packed rank-major; a start beyond
# this waits for the oldest (without a bound, the packed copies of a whole model's gradients lived
# until the step's end)
MAX_PACKED_IN_FLIGHT = 2


class GradBuffer:
    """The gradients of `params` (replicated over `group`: `size` ranks, this one `rank`), in the
    order their gradients become final. `sharded` (ZeRO-1): reduce-scattered into row shards."""

    def __init__(self, params: list[nn.Parameter], group: Optional[dist.ProcessGroup], size: int, rank: int,
                 sharded: bool = False, bucket_numel: int = BUCKET_NUMEL, overlap: bool = False,
                 grad_dtype: Optional[torch.dtype] = None) -> None:
        """`grad_dtype`: what the gradients accumulate and reduce in (None: the parameters' dtype)."""
        self.params, self.group, self.size, self.rank = params, group, size, rank
        self.sharded, self.overlap = sharded, overlap
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise ValueError(f"one gradient buffer holds one dtype; these parameters have {sorted(map(str, dtypes))}")
        dtype = grad_dtype or (dtypes.pop() if dtypes else torch.float32)
        self.main_grads = any(p.dtype != dtype for p in params)  # `.grad` moves into `p.main_grad`
        device = params[0].device if params else torch.device("cpu")
        self.rows = [math.ceil(p.shape[0] / size) if sharded else 0 for p in params]  # R per parameter
        spans = [r * size * _row_numel(p) if sharded else p.numel() for p, r in zip(params, self.rows)]
        self.offsets, self.spans = _starts(spans), spans  # where each parameter starts, and its length
        self.data = torch.zeros(sum(spans), dtype=dtype, device=device)
        self.buckets = split_buckets(spans, bucket_numel)  # parameter indices per collective
        self._bucket_of = {id(params[i]): b for b, bucket in enumerate(self.buckets) for i in bucket}
        # sharded: this rank's rows of each gradient, [R, ...]: views of the buffer itself, where the
        # reduce-scatter lands them (no second buffer: the master shards' gradients cost nothing more)
        self.shard_grads = [self.data[o + rank * r * _row_numel(p):o + (rank + 1) * r * _row_numel(p)].view(r, *p.shape[1:])
                            for p, o, r in zip(params, self.offsets, self.rows)] if sharded else []
        self._lock = threading.Lock()  # DualPipe's F&B pairs run a backward on a second thread
        self._works: dict[int, tuple] = {}  # bucket -> (its collective's work or None, what it lands), oldest first
        self._expected: set[int] = set()  # ids of parameters whose next accumulation is final
        self._final: set[int] = set()
        self._final_count = [0] * len(self.buckets)
        self._next = 0  # the next bucket to start
        if overlap or self.main_grads:
            for p in params:
                p.register_post_accumulate_grad_hook(self._after_accumulate)

    def attach(self) -> None:
        """Every parameter's `.grad` (or `.main_grad`) a view of the buffer (call once the parameters
        are allocated)."""
        for p, start in zip(self.params, self.offsets):
            view = self.data[start:start + p.numel()].view(p.shape)
            if self.main_grads:
                p.main_grad = view
            else:
                p.grad = view

    @torch.no_grad()
    def _after_accumulate(self, p: torch.Tensor) -> None:
        """Autograd left a gradient in p.grad: into the main gradient (in its precision), then counted.
        (Autograd also calls this when a backward gave p no gradient: a weight gradient deferred to a
        W action; p.grad is None then.)"""
        if self.main_grads and p.grad is not None:
            p.main_grad.add_(p.grad)
            p.grad = None
        self.grad_accumulated(p)

    def holds(self, p: torch.Tensor) -> bool:
        return id(p) in self._bucket_of

    # -- overlap -----------------------------------------------------------------------------------
    def expect_final(self, params: Iterable[torch.Tensor]) -> None:
        """The next accumulation of each of `params` is its last of the step."""
        if self.overlap:
            with self._lock:
                self._expected.update(id(p) for p in params if id(p) in self._bucket_of)

    def grad_accumulated(self, p: torch.Tensor) -> None:
        """A gradient was added to p.grad (autograd's post-accumulate hook, or a W action)."""
        if not self.overlap:
            return
        with self._lock:
            if id(p) in self._final and self._bucket_of[id(p)] < self._next:
                raise RuntimeError(f"a gradient of a parameter of shape {tuple(p.shape)} arrived after its bucket's "
                                   "reduction started: the runner marked it final too early")
            if id(p) in self._expected:
                self._expected.discard(id(p))
                self._mark(p)
                self._start_ready()

    def mark_final(self, params: Iterable[torch.Tensor]) -> None:
        """`params` have their step's gradients now (one that got none adds zeros)."""
        if self.overlap:
            with self._lock:
                for p in params:
                    if id(p) in self._bucket_of and id(p) not in self._final:
                        self._expected.discard(id(p))
                        self._mark(p)
                self._start_ready()

    def _mark(self, p: torch.Tensor) -> None:
        if id(p) not in self._final:
            self._final.add(id(p))
            self._final_count[self._bucket_of[id(p)]] += 1

    def _start_ready(self) -> None:
        while self._next < len(self.buckets) and self._final_count[self._next] == len(self.buckets[self._next]):
            self._start(self._next)
            self._next += 1

    @property
    def started(self) -> list[int]:
        """Buckets whose collective has started this step."""
        return list(range(self._next))

    # -- the collectives ---------------------------------------------------------------------------
    def _span(self, b: int) -> tuple[int, int]:
        first, last = self.buckets[b][0], self.buckets[b][-1]
        return self.offsets[first], self.offsets[last] + self.spans[last]

    @torch.no_grad()
    def _start(self, b: int) -> None:
        start, end = self._span(b)
        if not self.sharded:
            flat = self.data[start:end]
            work = dist.all_reduce(flat, group=self.group, async_op=True) if self.group is not None else None
            self._works[b] = (work, None)
            return
        # rank-major: chunk n holds rows [n R, (n + 1) R) of every parameter of the bucket
        columns = [self.data[self.offsets[i]:self.offsets[i] + self.spans[i]].view(self.size, -1) for i in self.buckets[b]]
        send_NC = torch.cat(columns, dim=1)
        if self.group is None:
            self._works[b] = (None, send_NC[0])
        else:
            mine_C = send_NC.new_empty(send_NC.shape[1])
            self._works[b] = (_reduce_scatter(mine_C, send_NC.reshape(-1), group=self.group, async_op=True), mine_C)
        while len(self._works) > MAX_PACKED_IN_FLIGHT:  # each holds a packed copy of its bucket until done
            self._land(next(iter(self._works)))

    def _land(self, b: int) -> None:
        """Wait for bucket b's collective; under ZeRO-1 copy this rank's reduced rows into place."""
        work, mine_C = self._works.pop(b)
        if work is not None:
            work.wait()
        if mine_C is not None:
            bucket = self.buckets[b]
            pieces = mine_C.split([self.shard_grads[i].numel() for i in bucket])
            torch._foreach_copy_([self.shard_grads[i].view(-1) for i in bucket], list(pieces))

    @torch.no_grad()
    def finish(self, scale: float) -> None:
        """Start every bucket not started yet (in order), wait for all, multiply by `scale`: the
        parameters' gradients (all-reduce) or this rank's shard gradients (reduce-scatter) are then
        scale x the sum over the group."""
        with self._lock:
            self._start_ready_all()
            for b in list(self._works):
                self._land(b)
            if self.sharded:
                if self.shard_grads:
                    torch._foreach_mul_(self.shard_grads, scale)
            else:
                self.data.mul_(scale)
            self._expected.clear()
            self._final.clear()
            self._final_count = [0] * len(self.buckets)
            self._next = 0

    def _start_ready_all(self) -> None:
        while self._next < len(self.buckets):
            self._start(self._next)
            self._next += 1

    @property
    def reduced(self) -> list[torch.Tensor]:
        """The reduced gradients the optimizer reads, after `finish`: this rank's shard rows (ZeRO-1)
        or the whole flat buffer."""
        return self.shard_grads if self.sharded else [self.data]

    def zero_(self) -> None:
        """No gradients for the next step (the views stay)."""
        self.data.zero_()


def accumulated_grad(p: torch.Tensor) -> Optional[torch.Tensor]:
    """What p's gradients accumulate in: `p.main_grad` where a gradient buffer keeps them in a higher
    precision than p, else `p.grad`."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def split_buckets(sizes: list[int], bucket_numel: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's sizes sum to at most `bucket_numel` (a
    larger item alone)."""
    buckets: list[list[int]] = []
    current, numel = [], 0
    for i, size in enumerate(sizes):
        if current and numel + size > bucket_numel:
            buckets.append(current)
            current, numel = [], 0
        current.append(i)
        numel += size
    if current:
        buckets.append(current)
    return buckets


def _row_numel(p: torch.Tensor) -> int:
    return p[0].numel()


def _starts(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out
