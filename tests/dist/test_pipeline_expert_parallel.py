"""Pipeline x expert (x data) parallelism on the tiny DeepSeek-V3, through the trainer's pipelined
micro-batches: DualPipe(V)'s F&B pairs overlap (backward on a side thread; backward all-to-alls on
lane 1, forward ones on lane 0) or run one after the other, and every gradient after reduction
equals one process on the same data."""
import copy
import threading
from contextlib import contextmanager

import pytest
import torch

import moetron.comm.a2a as a2a_module
from moetron.comm.lanes import IssueOrder, current_lane
from moetron.core.convert import apply_converters
from moetron.models.deepseek_v3 import DeepSeekV3, load_preset
from moetron.parallel.recompute import RECOMPUTE_SWITCHES, SelectiveRecompute
from moetron.parallel.weight_grads import deferred_parameters
from moetron.models import get_spec
from moetron.parallel.dims import ParallelDims, Topology, build_groups
from moetron.parallel.finalize import StepFinalizer
from moetron.pipeline.builders import build_schedule, comm_lanes
from moetron.parallel.grad_buffer import BUCKET_NUMEL, GradBuffer
from moetron.pipeline.grads_final import gradient_order
from moetron.pipeline.runtime import PipelineRunner
from moetron.train.micro_batches import PipelinedMicroBatches, stage_parameters
from tests.dist.harness import run_ranks

ROWS, SEQ, LAYERS = 2, 16, 4


class RecordingOrder(IssueOrder):
    """The issue order, logging "pair" / "end" around each F&B pair and the lane of every collective."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list = []

    @contextmanager
    def pair(self):
        self.log.append("pair")
        with super().pair():
            yield
        self.log.append("end")

    @contextmanager
    def turn(self, lane: int):
        with super().turn(lane):
            self.log.append(lane)
            yield


def _pipelined(model, rank, world, dims, schedule, overlap, dtype, n, dispatcher="alltoall", order=None,
               zero1=False, overlap_reduce=False, bucket_numel=BUCKET_NUMEL):
    """`model` under EP and the trainer's pipelined micro-batches and step finalizer, built as the
    trainer builds them; returns (groups, micro, finalizer)."""
    groups = build_groups(dims, Topology(1, world), rank, comm_lanes(schedule, dims.pp, overlap))
    groups.order = order
    spec = get_spec("deepseek_v3")
    made = spec.parallelize(model, groups, dispatcher, defer_weights=True)
    sched = build_schedule(schedule, dims.pp, n)
    parts = spec.pipeline_split(model, sched, groups.pp_rank, None, n)
    stage_params = stage_parameters(sched, parts)
    deferred = deferred_parameters(model, made.weight_grad_store)
    finalizer = StepFinalizer(model, made.expert_params, groups, 0.0, parts.holders, parts.shared, zero1=zero1,
                              overlap_grad_reduce=overlap_reduce, bucket_numel=bucket_numel,
                              grad_order=gradient_order(sched.actions[groups.pp_rank], stage_params, deferred))
    if overlap_reduce:
        made.weight_grad_store.on_accumulated = finalizer.grad_accumulated
    micro = PipelinedMicroBatches(lambda n: sched, parts, groups.pp_rank, groups.lanes("pp"), (ROWS, SEQ, model.cfg.hidden_size),
                                  torch.device("cpu"), dtype, overlap, made.weight_grad_store,
                                  finalizer if overlap_reduce else None, stage_params, deferred)
    return groups, micro, finalizer


def pp_ep(rank, world, pp, dp, ep, schedule, overlap, n, dispatcher="alltoall", ordered=False):
    torch.manual_seed(0)
    cfg = load_preset("tiny", num_hidden_layers=LAYERS, n_routed_experts=8)
    reference = DeepSeekV3(cfg).train()
    data_ranks = dp * ep
    ids = torch.randint(0, cfg.vocab_size, (data_ranks, n, ROWS, SEQ + 1))
    for batch in ids.view(-1, ROWS, SEQ + 1):  # the whole step in one process
        (reference(batch[:, :-1], batch[:, 1:]).loss / (n * data_ranks)).backward()

    model = copy.deepcopy(reference)
    order = RecordingOrder() if ordered else None
    groups, micro, finalizer = _pipelined(model, rank, world, ParallelDims(pp=pp, dp=dp, ep=ep), schedule, overlap,
                                          torch.float32, n, dispatcher, order)
    seen = set()  # (main thread?, lane) of every exchange, forward and backward
    real_exchange = a2a_module._exchange

    def recording_exchange(*args, **kwargs):
        seen.add((threading.current_thread() is threading.main_thread(), current_lane()))
        return real_exchange(*args, **kwargs)

    a2a_module._exchange = recording_exchange
    try:
        mine = ids[groups.data_rank]
        micro.run([(b[:, :-1], b[:, 1:]) for b in mine], {"mtp_weight": cfg.mtp_loss_weight})
    finally:
        a2a_module._exchange = real_exchange
    finalizer.finish_gradients()  # grad_clip 0: reduce and sum only

    ref_params = dict(reference.named_parameters())
    local = cfg.n_routed_experts // ep
    held = {id(p) for m in micro.parts.held_modules for p in m.parameters()}
    pairs = {}
    for name, p in model.named_parameters():
        if id(p) not in held:
            continue
        ref_grad = ref_params[name].grad
        if p.shape != ref_params[name].shape:  # an expert shard
            ref_grad = ref_grad[groups.ep_rank * local:(groups.ep_rank + 1) * local]
        pairs[name] = (p.grad, ref_grad)
    return {"grads": pairs, "seen": seen, "stage": groups.pp_rank, "order_log": order.log if order else None}


@pytest.mark.parametrize("pp,dp,ep,schedule,overlap", [
    (2, 1, 2, "dualpipev", True), (2, 1, 2, "dualpipev", False), (2, 1, 2, "dualpipe", True),
    (2, 2, 2, "dualpipev", True)])
def test_pipeline_with_expert_parallelism_matches_one_process(pp, dp, ep, schedule, overlap):
    n = 2 * pp
    results = run_ranks(pp * dp * ep, pp_ep, pp, dp, ep, schedule, overlap, n)
    names = set()
    for res in results:
        names |= res["grads"].keys()
        _check_grads(res)
        # forward exchanges on lane 0, backward ones on lane 1; F&B pairs run their backward on a side thread
        expected = {(True, 0), (True, 1), (False, 1)} if overlap else {(True, 0), (True, 1)}
        assert res["seen"] == expected
    assert names == {name for name, _ in DeepSeekV3(load_preset("tiny", num_hidden_layers=LAYERS)).named_parameters()}


def _check_grads(res) -> None:
    for name, (grad, ref) in res["grads"].items():
        assert grad is not None, name
        # float32; partial sums reduced over ranks and pipeline copies: 1e-5 relative
        assert float((grad - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) < 1e-5, name


def pair_turns(log: list) -> list[list[int]]:
    """The lanes of the collectives issued inside each F&B pair, in order."""
    pairs, current = [], None
    for entry in log:
        if entry == "pair":
            current = []
        elif entry == "end":
            pairs.append(current)
            current = None
        elif current is not None:
            current.append(entry)
    return pairs


@pytest.mark.parametrize("schedule,dispatcher", [("dualpipev", "alltoall"), ("dualpipe", "hierarchical")])
def test_ordered_pairs_issue_collectives_in_one_order_on_every_rank(schedule, dispatcher):
    """With an IssueOrder (the trainer's default under NCCL) the halves of each pair take turns: lane 0
    first, one collective each, then the longer half alone; the EP peers of a stage log the very
    same sequence; the gradients still equal one process."""
    results = run_ranks(8, pp_ep, 2, 2, 2, schedule, True, 4, dispatcher, True)
    # some pairs have a dense or embedding chunk on one side (no collectives); rank 1's all have MoE layers
    assert any(0 in lanes and 1 in lanes for res in results for lanes in pair_turns(res["order_log"]))
    for res in results:
        _check_grads(res)
        for lanes in pair_turns(res["order_log"]):
            n0, n1 = lanes.count(0), lanes.count(1)
            both = min(n0, n1)
            assert lanes == [0, 1] * both + [0] * (n0 - both) + [1] * (n1 - both)
    for stage in (0, 1):
        logs = [res["order_log"] for res in results if res["stage"] == stage]
        assert len(logs) == 4 and all(log == logs[0] for log in logs)


def _bf16_recompute_grads(rank, world, overlap):
    torch.manual_seed(0)
    cfg = load_preset("tiny", num_hidden_layers=LAYERS, n_routed_experts=8)
    model = DeepSeekV3(cfg).train()
    apply_converters(model, [SelectiveRecompute({s: True for s in RECOMPUTE_SWITCHES})])
    ids = torch.randint(0, cfg.vocab_size, (2, 4, ROWS, SEQ + 1))
    groups, micro, _ = _pipelined(model, rank, world, ParallelDims(pp=2, dp=1, ep=2), "dualpipev", overlap,
                                  torch.bfloat16, 4)
    sums = micro.run([(b[:, :-1], b[:, 1:]) for b in ids[groups.data_rank]], {"mtp_weight": 0.3})
    return sums, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_overlapped_pairs_keep_autocast_and_recompute_bitwise():
    """The side thread runs the backward under the caller's bf16 autocast, so recomputed regions
    (norms, MLA up-projections, SwiGLU) match what one thread computes, bit for bit."""
    overlapped = run_ranks(4, _bf16_recompute_grads, True)
    serial = run_ranks(4, _bf16_recompute_grads, False)
    for (sums_a, grads_a), (sums_b, grads_b) in zip(overlapped, serial, strict=True):
        assert torch.equal(sums_a, sums_b)
        assert grads_a.keys() == grads_b.keys() and grads_a
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name


def _reduced_grads(rank, world, schedule, zero1, dp, ep, overlap_reduce):
    """One step of a pipeline schedule at pp=2; returns the reduced gradients (the parameters', or
    under ZeRO-1 the shards') and the order of events: each compute action's begin and end, and
    each bucket's start."""
    torch.manual_seed(0)
    cfg = load_preset("tiny", num_hidden_layers=LAYERS, n_routed_experts=8)
    model = DeepSeekV3(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 4, ROWS, SEQ + 1))
    groups, micro, finalizer = _pipelined(model, rank, world, ParallelDims(pp=2, dp=dp, ep=ep), schedule, False,
                                          torch.float32, 4, zero1=zero1, overlap_reduce=overlap_reduce,
                                          bucket_numel=20_000)  # several buckets per stage
    events = []
    real_start, real_run = GradBuffer._start, PipelineRunner._run
    GradBuffer._start = lambda self, b: events.append(("start", b)) or real_start(self, b)
    PipelineRunner._run = lambda self, a: (events.append(("begin", str(a.kind))), real_run(self, a),
                                           events.append(("end", str(a.kind))))
    try:
        micro.run([(b[:, :-1], b[:, 1:]) for b in ids[groups.data_rank]], {"mtp_weight": 0.3})
        events.append(("finish", None))
        finalizer.finish_gradients()
    finally:
        GradBuffer._start, PipelineRunner._run = real_start, real_run
    grads = [g.clone() for g in finalizer._reduced.values()]
    return grads, events


@pytest.mark.parametrize("schedule,zero1,dp,ep", [("zb1p", False, 2, 1), ("dualpipev", True, 2, 1),
                                                  ("dualpipev", False, 1, 2), ("zb1p", True, 1, 2),
                                                  ("dualpipe", False, 2, 1)])
def test_overlapped_gradient_reduction_starts_during_the_pipeline_backward_and_is_bitwise_the_same(schedule, zero1,
                                                                                                  dp, ep):
    """Under a pipeline schedule each bucket's all-reduce (or ZeRO-1 reduce-scatter) starts once its
    stage's last backward / W action has made its gradients final, before the rank's backward ends;
    the reduced gradients are bitwise those of reducing after the step. With EP the expert stacks
    (sharded, their weight gradients deferred to W) take part; DualPipe's mirrored stages sum over
    the pipeline."""
    overlapped = run_ranks(4, _reduced_grads, schedule, zero1, dp, ep, True)
    blocking = run_ranks(4, _reduced_grads, schedule, zero1, dp, ep, False)
    for (grads_a, events), (grads_b, events_b) in zip(overlapped, blocking, strict=True):
        assert len(grads_a) == len(grads_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
        last_end = max(i for i, (what, kind) in enumerate(events) if what == "end" and kind in ("B", "BW", "W", "FB"))
        starts = [i for i, (what, _) in enumerate(events) if what == "start"]
        assert starts and starts[0] < last_end  # under way before the backward ends
        assert all(i > events_b.index(("finish", None)) for i, (what, _) in enumerate(events_b) if what == "start")
