"""Execute one rank's action list with real stage modules and point-to-point transfers.

    runner = PipelineRunner(schedule, rank, stage_modules, group, p2p_shape, dtype, store=store)
    result = runner.step(inputs={mb: x}, targets={mb: y}, loss_fn=...)  # .losses, .metrics

`stage_modules[s]` is this rank's module for stage s. A module returns its output, or (output,
metrics); the loss function returns the loss, or (loss, metrics): `metrics` are detached tensors of
one shape (a model's loss terms, say) that the runner adds up over the step and returns, so nothing
is kept on the modules. The runner executes the rank's actions with their transfers made explicit
(moetron.pipeline.transfers): `RECV_*` posts a receive one compute action ahead, `SEND_*` sends what
the compute before it produced; each run of them between two compute actions goes out as one
`batch_isend_irecv` per communicator (tagged by kind, micro-batch and stage; activations and
gradients on separate communicators when the group has two lanes). A forward waits for its input,
runs the module and keeps (input, output) for backward; the last stage of a chain applies
`loss_fn(output, target) * loss_scale`. `B` back-propagates to the stage input with the weight
gradients of linear and grouped-expert layers queued in the `WeightGradStore` it is handed (layers
that `moetron.parallel.weight_grads.defer_weight_grads` converted queue them; others compute theirs
at once); `W` runs the oldest queued batch; `BW` does both at once. Handed `grads` (the step
finalizer), the runner tells it when each parameter's gradients are final
(moetron.pipeline.grads_final), so their buckets' reduction starts while the schedule goes on. `FB` runs its backward on a side
thread while the forward runs here; backward collectives use lane 1, copies of the groups
(moetron.comm.lanes), forward ones lane 0: one micro-batch's all-to-all is in flight while the other
computes (`overlap=False` runs them one after the other). Where the groups carry an `IssueOrder`,
the two halves take turns issuing collectives, so every rank issues them in one order. On a GPU each
stage module (chunk) runs its forward on a stream of its own, and autograd runs every backward
kernel on its forward's stream, so the two halves of a pair (always different chunks) are on
different streams and can run at once; each forward first waits for the device's current stream
(where its input arrived) and that stream then waits for it (where its output is sent or used);
inputs and incoming gradients are recorded on the stream that reads them (`record_stream`), so the
caching allocator does not hand their memory to another stream too early. The step waits for all
sends before it returns. `busy_s` (compute, receive waits excluded) and `step_s` (wall time) of the
last step give the measured bubble; `action_s` holds each compute action's busy seconds by kind
(costs for the simulator), `action_spans` its (action, start, end) in `time.perf_counter()` seconds (a
timeline, drawn by moetron.pipeline.timeline). In profiler traces each action carries a label (`pipeline.F mb3 stage1`; a pair's halves
`pipeline.FB.forward ...`, `pipeline.FB.backward ...`).

Shape legend: B micro-batch rows, F features.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves

from moetron.comm.lanes import GroupLike, LaneGroup
from moetron.pipeline.grads_final import final_gradient_actions
from moetron.pipeline.schedule import Action, ActionKind, Schedule
from moetron.pipeline.transfers import peer_stage, with_transfers
from moetron.profiling import label
from moetron.core.saved_tensors import SavedTensorMeter, module_state
from moetron.core.weight_grads import WeightGradStore

K = ActionKind


@dataclass
class StepResult:
    losses: dict[int, torch.Tensor]  # micro-batch -> the loss it back-propagated (unscaled, detached), last stages only
    metrics: Optional[torch.Tensor]  # the sum of what the modules and the loss returned as metrics, or None


class PipelineRunner:
    def __init__(self, schedule: Schedule, rank: int, stage_modules: dict[int, nn.Module],
                 group: GroupLike, p2p_shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 store: Optional[WeightGradStore] = None, overlap: bool = True,
                 device: torch.device = torch.device("cpu"), grads=None, stage_params: Optional[dict] = None,
                 deferred: frozenset = frozenset(), meter: Optional[SavedTensorMeter] = None) -> None:
        """`meter`: notes what each forward saves for its backward, sampled after each forward
        (moetron.core.saved_tensors; a new one if None). `grads` (optional): told when gradients are final, `grads.expect_final(params)` before the
        action that adds their last gradient of the step and `grads.mark_final(params)` after it
        (the step finalizer, to start their buckets' reduction); `stage_params`: stage -> the
        parameters its backward reaches (its module's and, on a last stage, the loss tail's);
        `deferred`: ids of those whose weight gradient a B defers to W."""
        self.sched, self.rank, self.modules = schedule, rank, stage_modules
        self.actions = with_transfers(schedule)[rank]  # compute, sends and receives, in order
        # activations travel on lane 0, gradients on lane 1 when the group has one: NCCL matches a rank
        # pair's transfers by order, and check_transfers guarantees the order per kind
        copies = group.groups if isinstance(group, LaneGroup) else [group]
        self._p2p_groups = (copies[0], copies[-1])
        self._order = group.order if isinstance(group, LaneGroup) else None  # turns of the lanes in a pair
        for comm in {id(g): g for g in self._p2p_groups if g is not None}.values():
            # set the communicators up now, on every rank of the pipeline at once: NCCL creates one at
            # its first use, which would otherwise block a rank mid-schedule on peers that wait on it
            dist.barrier(group=comm)
        self.shape, self.dtype, self.device = p2p_shape, dtype, device
        # a schedule of forwards only (evaluation: moetron.pipeline.schedule.forward_only) keeps nothing for backward
        self._backward_follows = any(a.kind in (K.B, K.BW, K.FB) for a in self.actions)
        self._device_module = torch.get_device_module(device)  # torch.cuda on GPUs; torch.cpu's streams do nothing
        self._streams = {stage: self._device_module.Stream() for stage in stage_modules}
        self.store = store if store is not None else WeightGradStore()  # an empty store is falsy (len 0)
        self.overlap = overlap
        self._pool: Optional[ThreadPoolExecutor] = None
        self._grads = grads
        self.meter = meter if meter is not None else SavedTensorMeter(module_state(stage_modules.values()))
        self._final_at = final_gradient_actions(self.actions, stage_params or {}, deferred) if grads is not None else {}

    # -- transfers -------------------------------------------------------------------------------
    def _tag(self, kind: int, mb: int, stage: int) -> int:
        return (kind * self.sched.num_microbatches + mb) * 4096 + stage

    def _peer(self, stage: int) -> int:
        rank = self.sched.rank_of_stage[stage]
        group = self._p2p_groups[0]
        return dist.get_global_rank(group, rank) if group is not None else rank

    def _post_transfers(self, actions: list[Action]) -> None:
        """Post a run of SEND_* / RECV_* actions as one batch per communicator (batch_isend_irecv:
        NCCL launches a batch together); receives are waited for by the compute that consumes them."""
        batches: dict[int, list[tuple[Action, int, dist.P2POp]]] = {}
        for a in actions:
            kind = 0 if a.kind in (K.SEND_F, K.RECV_F) else 1  # activation or gradient
            group, peer = self._p2p_groups[kind], peer_stage(self.sched, a)
            if a.kind in (K.RECV_F, K.RECV_B):
                buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                op = dist.P2POp(dist.irecv, buf, self._peer(peer), group, self._tag(kind, a.mb, a.stage))
            else:
                tensor = self._outbox.pop((kind, a.mb, a.stage)).to(self.dtype).contiguous()
                op = dist.P2POp(dist.isend, tensor, self._peer(peer), group, self._tag(kind, a.mb, peer))
            batches.setdefault(id(group), []).append((a, kind, op))
        for batch in batches.values():
            works = dist.batch_isend_irecv([op for _, _, op in batch])
            for (a, kind, op), work in zip(batch, works):
                if a.kind in (K.RECV_F, K.RECV_B):
                    self._posted[(kind, a.mb, a.stage)] = (work, op.tensor)
                else:
                    self._sends.append((work, op.tensor))

    def _received(self, kind: int, mb: int, stage: int) -> torch.Tensor:
        """The tensor a posted receive brings to (mb, stage), once it has arrived."""
        if (kind, mb, stage) not in self._posted:
            raise RuntimeError(f"{self.sched.name} rank {self.rank}: no receive was posted for "
                               f"{'activation' if kind == 0 else 'gradient'} of micro-batch {mb} at stage {stage}")
        work, buf = self._posted.pop((kind, mb, stage))
        started = time.perf_counter()
        work.wait()
        self._waits.seconds = self._waited_s() + time.perf_counter() - started
        return buf

    def _waited_s(self) -> float:
        """Seconds the calling thread has waited for transfers this step."""
        return getattr(self._waits, "seconds", 0.0)

    # -- compute ---------------------------------------------------------------------------------
    def _forward_input(self, mb: int, stage: int) -> torch.Tensor:
        prev = self.sched.prev_stage(mb, stage)
        if prev is None:
            x = self._inputs[mb]
        elif self.sched.rank_of_stage[prev] == self.rank:
            x = self._local_acts.pop((mb, stage)).detach()
        else:
            x = self._received(0, mb, stage)
        return x.requires_grad_(prev is not None)

    def _forward_compute(self, mb: int, stage: int, x: torch.Tensor) -> torch.Tensor:
        ambient, stream = self._device_module.current_stream(), self._streams[stage]
        stream.wait_stream(ambient)  # the input arrived on the ambient stream
        self._use_on(x, stage)
        saving = self.meter.saving((mb, stage)) if self._backward_follows else nullcontext()
        with self._device_module.stream(stream), saving:
            out = self._keep_metrics(self.modules[stage](x, **self._stage_kwargs.get(mb, {})))
            if self.sched.next_stage(mb, stage) is None:
                loss = self._keep_metrics(self._loss_fn(out, self._targets[mb]))
                self._losses[mb] = loss.detach()
                out = loss * self._loss_scale
        ambient.wait_stream(stream)  # sends and the next chunk read the output there
        if self._backward_follows:
            self._saved[(mb, stage)] = (x, out)
            self.meter.sample()
        return out

    def _keep_metrics(self, returned):
        """The tensor of (tensor, metrics), adding metrics to the step's sum; a tensor as it is."""
        if not isinstance(returned, tuple):
            return returned
        out, metrics = returned
        if metrics is not None:  # kept alive to the end of the step: summed there, on the ambient stream
            self._metrics.append(metrics.detach())
        return out

    def _forward_emit(self, mb: int, stage: int, out: torch.Tensor) -> None:
        nxt = self.sched.next_stage(mb, stage)
        if nxt is None:
            return
        if self.sched.rank_of_stage[nxt] == self.rank:
            self._local_acts[(mb, nxt)] = out
        else:
            self._outbox[(0, mb, stage)] = out.detach()

    def _backward_grad(self, mb: int, stage: int) -> Optional[torch.Tensor]:
        nxt = self.sched.next_stage(mb, stage)
        if nxt is None:
            return None
        if self.sched.rank_of_stage[nxt] == self.rank:
            return self._local_grads.pop((mb, stage))
        return self._received(1, mb, stage)

    def _use_on(self, t: Optional[torch.Tensor], stage: int) -> None:
        """`t` is about to be read on the stage's stream: keep the caching allocator from handing its
        memory to another stream before that stream's reads are done. It matters for a chunk's
        output that the next chunk on this rank reads (and the gradient coming back), made on one
        chunk's stream and read on another's, perhaps while the first runs the other half of a pair."""
        if t is not None and t.device.type == "cuda":
            t.record_stream(self._streams[stage])

    def _backward_compute(self, mb: int, stage: int, grad: Optional[torch.Tensor], defer_weights: bool):
        x, out = self._saved.pop((mb, stage))
        self._use_on(grad, stage)
        self.store.enabled = defer_weights
        torch.autograd.backward(out, grad)
        self.store.enabled = False
        if defer_weights:
            self.store.close_batch()
        return x.grad

    def _backward_emit(self, mb: int, stage: int, grad_x: Optional[torch.Tensor]) -> None:
        prev = self.sched.prev_stage(mb, stage)
        if prev is None:
            return
        if self.sched.rank_of_stage[prev] == self.rank:
            self._local_grads[(mb, prev)] = grad_x
        else:
            self._outbox[(1, mb, stage)] = grad_x

    def _forward(self, mb: int, stage: int) -> None:
        self._forward_emit(mb, stage, self._forward_compute(mb, stage, self._forward_input(mb, stage)))

    def _backward(self, mb: int, stage: int, defer_weights: bool) -> None:
        self._backward_emit(mb, stage, self._backward_compute(mb, stage, self._backward_grad(mb, stage), defer_weights))

    def _forward_backward(self, a: Action) -> None:
        """DualPipe's F&B: the backward runs on a second thread (its collectives on lane 1) while this
        thread runs the forward (lane 0), so the all-to-all of one is in flight while the other
        computes. Both inputs were posted ahead by this thread; the sends follow the pair."""
        if not self.overlap:
            self._forward(a.mb, a.stage)
            self._backward(a.mb2, a.stage2, defer_weights=False)
            return
        with self._order.pair() if self._order is not None else nullcontext():
            backward = self._side_thread().submit(self._with_callers_autocast, self._side_backward, a.mb2, a.stage2)
            started, waited = time.perf_counter(), self._waited_s()
            try:
                x = self._forward_input(a.mb, a.stage)
                main_wait = self._waited_s() - waited
                with label(f"pipeline.FB.forward mb{a.mb} stage{a.stage}"):
                    self._forward_emit(a.mb, a.stage, self._forward_compute(a.mb, a.stage, x))
                main_busy = time.perf_counter() - started - main_wait
            finally:
                self._leave(0)
                side_wait = backward.result()  # re-raises the backward's error, after the forward settled
        # the rank idles while both threads wait: at the start, and after the forward if the backward's input is late
        idle = min(side_wait, main_wait) + max(0.0, side_wait - main_wait - main_busy)
        self._idle_adjust_s += idle - main_wait

    def _side_backward(self, mb: int, stage: int) -> float:
        """Wait for its input, run one full backward, leave its output to be sent; return the wait."""
        try:
            waited = self._waited_s()
            grad = self._backward_grad(mb, stage)
            wait = self._waited_s() - waited
            with label(f"pipeline.FB.backward mb{mb} stage{stage}"):
                self._backward_emit(mb, stage, self._backward_compute(mb, stage, grad, defer_weights=False))
            return wait
        finally:
            self._leave(1)

    def _leave(self, lane: int) -> None:
        """This half of the pair has issued its last collective: the other lane goes on alone."""
        if self._order is not None:
            self._order.leave(lane)

    def _side_thread(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # the current device is per thread: the side thread's would otherwise be GPU 0 on every rank
            # (a device given without its index, "cuda", is the caller's current one)
            device = self.device
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moetron-fb",
                                            initializer=self._device_module.set_device, initargs=(device,))
        return self._pool

    def _with_callers_autocast(self, fn: Callable, *args):
        """Run `fn` with the caller's autocast state (it is per thread; recomputed regions need it).
        Set directly, not by entering `torch.autocast`: leaving that context would clear the cast
        cache, which all threads share, in the middle of the other thread's forward."""
        previous = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d, _ in self._autocast]
        for device_type, dtype in self._autocast:
            torch.set_autocast_enabled(device_type, True)
            torch.set_autocast_dtype(device_type, dtype)
        try:
            return fn(*args)
        finally:
            for device_type, enabled, dtype in previous:
                torch.set_autocast_enabled(device_type, enabled)
                torch.set_autocast_dtype(device_type, dtype)

    def _run(self, a: Action) -> None:
        started, waited, adjust = time.perf_counter(), self._waited_s(), self._idle_adjust_s
        with label(f"pipeline.{a.kind} mb{a.mb} stage{a.stage}"):  # a region in profiler traces
            self._dispatch(a)
        idle = self._waited_s() - waited + self._idle_adjust_s - adjust
        ended = time.perf_counter()
        busy = ended - started - idle
        self.busy_s += busy
        self.action_s.setdefault(a.kind, []).append(busy)
        self.action_spans.append((a, started, ended))

    def _dispatch(self, a: Action) -> None:
        if a.kind == K.F:
            self._forward(a.mb, a.stage)
        elif a.kind in (K.B, K.BW):
            self._backward(a.mb, a.stage, defer_weights=a.kind == K.B)
        elif a.kind == K.W:
            self.store.run_oldest()
        else:
            self._forward_backward(a)

    def step(self, inputs: dict[int, torch.Tensor], targets: dict[int, torch.Tensor],
             loss_fn: Callable, loss_scale: float = 1.0, stage_kwargs: Optional[dict[int, dict]] = None
             ) -> StepResult:
        """Run this rank's actions for one optimizer step: the losses of its last stages' micro-batches
        and the sum of the metrics its modules and the loss returned. `stage_kwargs`: keyword
        arguments of every stage's forward, per micro-batch (its packed samples)."""
        self._inputs, self._targets, self._loss_fn, self._loss_scale = inputs, targets, loss_fn, loss_scale
        self._stage_kwargs = stage_kwargs or {}
        self.meter.ignore(tree_leaves((inputs, targets)))  # held by the caller all step
        self._saved, self._local_acts, self._local_grads, self._losses = {}, {}, {}, {}
        self._metrics: list[torch.Tensor] = []
        self._posted, self._outbox, self._sends = {}, {}, []
        self.busy_s, self._idle_adjust_s, self._waits = 0.0, 0.0, threading.local()
        self.action_s: dict[str, list[float]] = {}
        self.action_spans: list[tuple[Action, float, float]] = []  # (action, start, end) of each compute action
        self._autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        started = self.step_started = time.perf_counter()
        transfers: list[Action] = []
        for i, action in enumerate(self.actions):
            if action.kind.is_transfer:
                transfers.append(action)
                continue
            self._post_transfers(transfers)
            transfers = []
            final = self._final_at.get(i)
            if final and action.kind != K.FB:  # an FB's backward runs on the side thread, amid the pair's
                self._grads.expect_final(final)  # collectives: its buckets start after the pair
            self._run(action)
            if final:
                self._grads.mark_final(final)
        self._post_transfers(transfers)
        for work, _ in self._sends:
            work.wait()
        self.step_s = time.perf_counter() - started
        assert not (self._saved or self._posted or self._outbox or len(self.store)), "schedule left work undone"
        metrics = torch.stack(self._metrics).sum(0) if self._metrics else None
        return StepResult(self._losses, metrics)
