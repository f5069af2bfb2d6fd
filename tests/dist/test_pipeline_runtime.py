"""Every schedule executed on gloo ranks against one process running the stages in order
(DualPipe's mirrored stages sum their gradients first), as DualPipe's own examples check."""
import contextlib
import copy
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moetron.core.weight_grads import WeightGradStore
from moetron.parallel.weight_grads import defer_weight_grads
from moetron.pipeline.builders import build_schedule
from moetron.pipeline.runtime import PipelineRunner
from tests.dist.harness import run_ranks

HIDDEN, ROWS = 16, 3


def _blocks(num):
    torch.manual_seed(233)
    return [nn.Sequential(nn.Linear(HIDDEN, 32), nn.GELU(), nn.Linear(32, HIDDEN)) for _ in range(num)]


def _data(n):
    g = torch.Generator().manual_seed(7)
    return ({mb: torch.randn(ROWS, HIDDEN, generator=g) for mb in range(n)},
            {mb: torch.randn(ROWS, HIDDEN, generator=g) for mb in range(n)})


def _reference(name, P, n):
    sched = build_schedule(name, P, n)
    blocks = _blocks(len(sched.chains[0]))
    inputs, targets = _data(n)
    losses = {}
    for mb in range(n):
        out = inputs[mb]
        for block in blocks:
            out = block(out)
        loss = F.mse_loss(out, targets[mb])
        (loss / n).backward()
        losses[mb] = loss.detach()
    return losses, [[p.grad for p in b.parameters()] for b in blocks]


def _pipeline(rank, world, name, n):
    sched = build_schedule(name, world, n)
    blocks = _blocks(len(sched.chains[0]))
    store = WeightGradStore()  # B actions defer the converted linears' weight gradients to W actions
    mine = {s: defer_weight_grads(copy.deepcopy(blocks[sched.module_of_stage[s]]), store) for s in sched.stages_on(rank)}
    runner = PipelineRunner(sched, rank, mine, dist.group.WORLD, (ROWS, HIDDEN), store=store)
    inputs, targets = _data(n)
    queued = []
    put = store.put
    store.put = lambda fn: queued.append(1) or put(fn)
    losses = runner.step(inputs, targets, F.mse_loss, loss_scale=1.0 / n).losses
    assert bool(queued) == any(a.kind == "B" for a in sched.actions[rank])
    # the timeline: one span per compute action, in the rank's order, one after the other
    assert [a for a, _, _ in runner.action_spans] == sched.actions[rank]
    assert all(s0 <= e0 <= s1 for (_, s0, e0), (_, s1, _) in zip(runner.action_spans, runner.action_spans[1:]))
    return losses, {sched.module_of_stage[s]: [p.grad for p in m.parameters()] for s, m in mine.items()}


@pytest.mark.parametrize("name", ["1f1b", "interleaved_1f1b", "zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("extra", [0, 4], ids=["minimum", "more"])
def test_schedule_runtime_matches_single_process(name, pp, extra):
    n = (2 * pp if name in ("dualpipe", "dualpipev") else pp) + extra
    ref_losses, ref_grads = _reference(name, pp, n)
    results = run_ranks(pp, _pipeline, name, n)
    losses, grads = {}, {}
    for rank_losses, rank_grads in results:
        losses.update(rank_losses)
        for depth, gs in rank_grads.items():  # DualPipe: a depth lives on two ranks; sum the mirrors
            grads[depth] = gs if depth not in grads else [a + b for a, b in zip(grads[depth], gs, strict=True)]
    assert sorted(losses) == list(range(n))
    for mb in range(n):
        assert torch.equal(losses[mb], ref_losses[mb])  # the same float32 ops in the same order: bitwise
    for depth, ref in enumerate(ref_grads):
        for g, r in zip(grads[depth], ref, strict=True):
            # per-micro-batch contributions accumulate in another order (and mirrors add): 1e-6 relative
            assert float((g - r).abs().max() / r.abs().max()) < 1e-6, f"depth {depth}"


class _Sleep(torch.autograd.Function):
    """Identity that sleeps `s` seconds in forward and again in backward (wall time, not CPU)."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.s = s
        time.sleep(s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.s)
        return grad, None


class _SleepStage(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.linear, self.s = nn.Linear(HIDDEN, HIDDEN), s

    def forward(self, x):
        return _Sleep.apply(self.linear(x), self.s)


def _pair_times(rank, world, overlap, s):
    sched = build_schedule("dualpipev", world, 2 * world)
    mine = {st: _SleepStage(s) for st in sched.stages_on(rank)}
    runner = PipelineRunner(sched, rank, mine, dist.group.WORLD, (ROWS, HIDDEN), overlap=overlap)
    original = runner._run
    pair_s = []

    def timed(action):  # the pair's busy time: its wall time less the waits for its inputs
        busy = runner.busy_s
        original(action)
        if action.kind == "FB":
            pair_s.append(runner.busy_s - busy)

    runner._run = timed
    inputs, targets = _data(2 * world)
    runner.step(inputs, targets, F.mse_loss)
    return pair_s


def test_forward_backward_pairs_overlap():
    s = 0.15
    overlapped = [t for rank in run_ranks(2, _pair_times, True, s) for t in rank]
    serial = [t for rank in run_ranks(2, _pair_times, False, s) for t in rank]
    assert overlapped and len(overlapped) == len(serial)
    assert min(serial) >= 2 * s  # forward, then backward
    assert max(overlapped) < 1.6 * s  # both at once: about one sleep, not two


class _RecordingStreams:
    """Stands in for torch.cuda's stream API: records which stream is current on each thread, every
    wait between streams, and the threads that set their current device."""

    def __init__(self):
        self.local, self.waits, self.default = threading.local(), [], self.Stream(self, "default")
        self.devices = []

    def set_device(self, device):
        self.devices.append((threading.current_thread().name, device))

    class Stream:
        def __init__(self, api=None, name=None):
            self.api, self.name = api, name

        def wait_stream(self, other):
            self.api.waits.append((self.name, other.name))

    def current_stream(self):
        return getattr(self.local, "stream", self.default)

    @contextlib.contextmanager
    def stream(self, s):
        before = self.current_stream()
        self.local.stream = s
        try:
            yield
        finally:
            self.local.stream = before


class _StreamProbe(nn.Module):
    def __init__(self, block, api, seen, stage):
        super().__init__()
        self.block, self.api, self.seen, self.stage = block, api, seen, stage

    def forward(self, x):
        self.seen.append((self.stage, self.api.current_stream().name))
        return self.block(x)


@pytest.mark.parametrize("overlap", [True, False])
def test_one_rank_dualpipev_runs_each_chunk_on_its_stream(overlap):
    """DualPipeV on one rank (both chunks of the V; after warm-up every step an F&B pair) matches
    autograd bitwise, and every chunk's forward runs on the chunk's stream, fenced both ways with
    the ambient stream (inputs arrive there, outputs leave from there)."""
    n = 6
    ref_losses, ref_grads = _reference("dualpipev", 1, n)
    sched = build_schedule("dualpipev", 1, n)
    blocks = _blocks(2)
    api, seen = _RecordingStreams(), []
    runner = PipelineRunner(sched, 0, {s: _StreamProbe(blocks[s], api, seen, s) for s in (0, 1)}, None,
                            (ROWS, HIDDEN), overlap=overlap)
    runner._device_module = api
    runner._streams = {s: api.Stream(api, f"chunk{s}") for s in (0, 1)}
    handed_over = []  # (stage, what): tensors made elsewhere, read on the stage's stream
    runner._use_on = lambda t, stage: handed_over.append((stage, t is not None))
    inputs, targets = _data(n)
    losses = runner.step(inputs, targets, F.mse_loss, loss_scale=1.0 / n).losses
    assert all(torch.equal(losses[mb], ref_losses[mb]) for mb in range(n))
    for block, ref in zip(blocks, ref_grads, strict=True):
        for p, r in zip(block.parameters(), ref, strict=True):
            assert torch.equal(p.grad, r)
    assert sorted(seen) == sorted([(s, f"chunk{s}") for s in (0, 1) for _ in range(n)])
    assert api.waits == [w for s, _ in seen for w in ((f"chunk{s}", "default"), ("default", f"chunk{s}"))]
    # every forward's input and every backward's incoming gradient (none at the loss) is handed over
    assert sorted(handed_over) == sorted([(0, True)] * 2 * n + [(1, True)] * n + [(1, False)] * n)
    assert "FB" in [a.kind for a in sched.actions[0]]
    # the side thread runs on the rank's device (a new thread's current device is GPU 0)
    assert [(name.startswith("moetron-fb"), device) for name, device in api.devices] == \
        ([(True, runner.device)] if overlap else [])


def _in_flight(rank, world, name, n):
    sched = build_schedule(name, world, n)
    blocks = _blocks(len(sched.chains[0]))
    store = WeightGradStore()
    mine = {s: defer_weight_grads(copy.deepcopy(blocks[sched.module_of_stage[s]]), store) for s in sched.stages_on(rank)}
    runner = PipelineRunner(sched, rank, mine, dist.group.WORLD, (ROWS, HIDDEN), store=store, overlap=False)
    inputs, targets = _data(n)
    runner.step(inputs, targets, F.mse_loss, loss_scale=1.0 / n)
    return runner.meter.peak_tags, runner.meter.take_peak()


@pytest.mark.parametrize("name", ["1f1b", "interleaved_1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_each_rank_holds_the_micro_batches_in_flight_that_the_planner_counts(name):
    """The saved tensors alive after each forward (moetron.core.saved_tensors), counted by the
    (micro-batch, stage) that saved them, peak on each of 4 ranks where the pipeline simulator that
    the planner sizes activations by says (an F&B pair holds both of its micro-batches)."""
    from moetron.plan.estimate import peak_in_flight

    n = 8
    measured = run_ranks(4, _in_flight, name, n)
    assert [tags for tags, _ in measured] == list(peak_in_flight(name, 4, n))
    assert all(peak_bytes > 0 for _, peak_bytes in measured)
