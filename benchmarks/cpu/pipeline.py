"""Pipeline schedules on 8 gloo ranks (PP4 x EP2) with stages of controlled cost and a real
all-to-all inside each chunk, measured against the simulator and against torch.distributed.pipelining.

    python benchmarks/cpu/pipeline.py --pp 4 --ep 2 --microbatches 16 --f 0.02 --b 0.02 --w 0.01 --a2a-kib 2048

Each stage is a linear layer, a timed section split around an all-to-all among the stage's EP
ranks: the forward sleeps q F, exchanges `--a2a-kib` KiB, sleeps (1 - q) F (q: `--exchange-at`,
0.5 by default); the backward mirrors it with B, so its exchange comes (1 - q) B into it, and the
weight gradient sleeps W (deferred to the W action when a schedule splits B from W, in
ours by the weight-gradient store, in torch's by its autograd split). Sleeping keeps 8 ranks honest
on a 2-core machine: compute costs wall time, not contended CPU; the exchanges and P2P are real.
One device per rank: a rank's compute sections hold its device lock, so the two halves of an F&B
pair never compute at once; only an exchange overlaps the other half's compute.
Schedules that cut the same model into 2 x PP stages (interleaved 1F1B, DualPipeV, torch's
ScheduleDualPipeV) halve every cost and the exchange.

Rows: ours (1F1B, interleaved 1F1B, ZB1P, DualPipe, DualPipeV with F&B pairs overlapped, the same
with the halves taking turns to issue collectives (`_ordered`, the default under NCCL), and
DualPipeV with the pairs run one after the other) and torch's Schedule1F1B and ScheduleDualPipeV on
the same stage modules. Per rank, *idle* = step - the union of its compute (sleep) intervals (an
exchange that nothing hides counts as idle) and *bubble* = step - the union of its compute and
exchange intervals (waiting on pipeline neighbours alone, the DualPipe table's notion); ratios are
over the step, averaged over ranks. Two predictions sit beside each measurement: `nominal` gives the simulator
F + A, B + A, W (A: the exchange's time measured alone) and for an F&B pair max(F + A, B + W + A)
when overlapped, else their sum; `calibrated` gives it each action kind's mean busy time measured
in the step itself (for torch's schedules, those of our twin schedule with the same actions).
For our schedules, `exposed_exchange_s_by_kind` splits idle - bubble (exchange time no compute
hides) by the action it falls in, mean over ranks. With q = 0.5 and F = B, the two halves of an F&B
pair reach their exchanges at the same moment, and neither hides the other's; q != 0.5 staggers them.

Results: benchmarks/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moetron.comm.a2a import all_to_all
from moetron.comm.lanes import IssueOrder, LaneGroup
from moetron.parallel.dims import ParallelDims, Topology, build_groups
from moetron.parallel.local_ranks import run_ranks
from moetron.core.weight_grads import WeightGradStore
from moetron.parallel.weight_grads import defer_weight_grads
from moetron.pipeline.builders import build_schedule
from moetron.pipeline.runtime import PipelineRunner
from moetron.pipeline.simulate import Costs, simulate

HIDDEN, ROWS = 64, 4
HALF_STAGES = ("interleaved_1f1b", "dualpipev", "dualpipev_ordered", "dualpipev_serial", "torch_dualpipev")
OURS = {"1f1b": "1f1b", "interleaved_1f1b": "interleaved_1f1b", "zb1p": "zb1p", "dualpipe": "dualpipe",
        "dualpipev": "dualpipev", "dualpipev_ordered": "dualpipev", "dualpipev_serial": "dualpipev"}
TORCH = ("torch_1f1b", "torch_dualpipev")


class ComputeLog:
    """(start, end, what) of every compute section and exchange on this rank, from any thread.

    One device per rank: a compute section holds the rank's device lock while it sleeps, so the two
    halves of an F&B pair never compute at once (a GPU runs one chunk's kernels at a time, at full
    occupancy); only an exchange, outside the lock, overlaps the other half's compute."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float, str]] = []
        self._lock = threading.Lock()
        self._device = threading.Lock()

    def add(self, started: float, what: str) -> None:
        with self._lock:
            self.spans.append((started, time.perf_counter(), what))

    def sleep(self, seconds: float) -> None:
        with self._device:
            started = time.perf_counter()
            time.sleep(seconds)
            self.add(started, "compute")

    def busy_s(self, since: float, kinds=("compute",), until: float = float("inf")) -> float:
        """Length of the union of the `kinds` spans that started after `since`, clipped at `until`."""
        total, end = 0.0, since
        for a, b, _ in sorted(s for s in self.spans if since <= s[0] < until and s[2] in kinds):
            b = min(b, until)
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    def exposed_exchange_s(self, since: float, until: float) -> float:
        """Exchange time in [since, until) that no compute span covers."""
        return self.busy_s(since, ("compute", "exchange"), until) - self.busy_s(since, ("compute",), until)


class _ExchangeStart(torch.autograd.Function):
    """Marks where an exchange begins; in backward, where the returning exchange ends."""

    @staticmethod
    def forward(ctx, x, log, mark):
        ctx.log, ctx.mark = log, mark
        mark["started"] = time.perf_counter()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.add(ctx.mark["back_started"], "exchange")
        return grad, None, None


class _ExchangeEnd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log, mark):
        ctx.mark = mark
        log.add(mark["started"], "exchange")
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.mark["back_started"] = time.perf_counter()
        return grad, None, None


class _Timed(torch.autograd.Function):
    """Identity; forward sleeps `f`, backward `b` (both through the compute log)."""

    @staticmethod
    def forward(ctx, x, seconds, log):
        ctx.b, ctx.log = seconds[1], log
        log.sleep(seconds[0])
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.log.sleep(ctx.b)
        return grad, None, None


class _WeightTimed(torch.autograd.Function):
    """Identity on a weight whose backward sleeps `w`: queued while our store defers weight grads;
    torch's zero-bubble split reaches it only in its weight pass."""

    @staticmethod
    def forward(ctx, weight, w, log, stage):
        ctx.w, ctx.log, ctx.stage = w, log, stage
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        store = ctx.stage.weight_grad_store
        if store is not None and store.enabled:
            store.put(lambda: ctx.log.sleep(ctx.w))
        else:
            ctx.log.sleep(ctx.w)
        return grad, None, None, None


class TimedStage(nn.Module):
    """linear -> sleep q F -> all-to-all of `a2a_rows` rows over the EP group -> sleep (1 - q) F.

    q = `exchange_at`; the backward runs in reverse, so its exchange comes (1 - q) B into it."""

    def __init__(self, costs, a2a_rows: int, ep_group, ep: int, log: ComputeLog, exchange_at: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(HIDDEN))
        self.costs, self.rows, self.group, self.ep, self.log = costs, a2a_rows, ep_group, ep, log
        self.exchange_at = exchange_at
        self.weight_grad_store = None  # defer_weight_grads hands the runner's store here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, b, w = self.costs
        q = self.exchange_at
        h = x @ _WeightTimed.apply(self.weight, w, self.log, self).t()
        h = _Timed.apply(h, (q * f, q * b), self.log)
        if self.rows:
            payload = h.mean(0, keepdim=True).expand(self.rows, HIDDEN) * 1.0
            split = [self.rows // self.ep] * self.ep
            mark: dict = {}  # the exchange's spans, forward and backward
            payload = _ExchangeStart.apply(payload, self.log, mark)
            received = _ExchangeEnd.apply(all_to_all(payload, split, split, self.group), self.log, mark)
            h = h + received.mean(0)
        return _Timed.apply(h, ((1 - q) * f, (1 - q) * b), self.log)


def _exposed_by_kind(log: ComputeLog, action_spans) -> dict[str, float]:
    """Exchange time that no compute hides, summed over this rank's actions of each kind."""
    out: dict[str, float] = {}
    for action, start, end in action_spans:
        kind = action.kind
        out[kind] = out.get(kind, 0.0) + log.exposed_exchange_s(start, end)
    return out


def _a2a_alone_s(rows: int, group, ep: int, repeat: int = 5) -> float:
    """Forward + backward exchange time of one stage's payload, all EP groups at once."""
    x = torch.randn(rows, HIDDEN, requires_grad=True)
    split = [rows // ep] * ep
    times = []
    for _ in range(repeat):
        dist.barrier()
        started = time.perf_counter()
        all_to_all(x, split, split, group).sum().backward()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] / 2  # one direction


def _torch_runner(name, modules, pp_rank, pp, pp_group, n):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

    ids = [pp_rank] if name == "torch_1f1b" else [pp_rank, 2 * pp - 1 - pp_rank]
    total = pp * len(ids)
    example = torch.empty(ROWS, HIDDEN, requires_grad=True)  # metadata: activations and outputs need grads
    stages = [PipelineStage(modules[i], i, total, torch.device("cpu"), input_args=(example,), output_args=example,
                            group=pp_group) for i in ids]
    loss = nn.functional.mse_loss
    schedule = Schedule1F1B(stages[0], n, loss_fn=loss) if name == "torch_1f1b" else ScheduleDualPipeV(stages, n, loss_fn=loss)
    x, y = torch.randn(n * ROWS, HIDDEN), torch.randn(n * ROWS, HIDDEN)

    def step():  # the first stage takes the inputs, the last the targets
        inputs = (x,) if 0 in ids else ()
        schedule.step(*inputs, **({"target": y, "losses": []} if total - 1 in ids else {}))

    return step


def _worker(rank, world, args):
    torch.set_num_threads(1)
    dims = ParallelDims(pp=args.pp, dp=1, ep=args.ep)
    groups = build_groups(dims, Topology(1, world), rank, lanes=2)
    ep_group = groups.lanes("ep")
    pp_rank, n = groups.pp_rank, args.microbatches
    rows_of = {"full": args.a2a_kib * 1024 // (HIDDEN * 4) // args.ep * args.ep}  # exchange rows per stage
    rows_of["half"] = rows_of["full"] // 2 // args.ep * args.ep
    results = {"a2a_alone_s": {size: _a2a_alone_s(rows, ep_group, args.ep) if rows else 0.0
                               for size, rows in rows_of.items()}}
    for name in args.schedules:
        half = name in HALF_STAGES
        costs = tuple(c / 2 for c in (args.f, args.b, args.w)) if half else (args.f, args.b, args.w)
        log = ComputeLog()

        # `_ordered`: the halves of each pair take turns issuing, as the trainer does under NCCL
        order = IssueOrder() if name.endswith("_ordered") else None

        def stage(costs=costs, rows=rows_of["half" if half else "full"], log=log, order=order):
            return TimedStage(costs, rows, LaneGroup(ep_group.groups, order), args.ep, log, args.exchange_at)

        if name in TORCH:
            modules = {s: stage() for s in range(2 * args.pp if half else args.pp)}
            run_step = _torch_runner(name, modules, pp_rank, args.pp, groups.pp_group, n)
        else:
            sched = build_schedule(OURS[name], args.pp, n)
            store = WeightGradStore()  # as parallelize does: stages whose weight gradients W actions run
            modules = {s: defer_weight_grads(stage(), store) for s in sched.stages_on(pp_rank)}
            pp_lanes = LaneGroup(groups.lanes("pp").groups, order)
            runner = PipelineRunner(sched, pp_rank, modules, pp_lanes, (ROWS, HIDDEN),
                                    overlap=not name.endswith("_serial"), store=store)
            inputs = {mb: torch.randn(ROWS, HIDDEN) for mb in range(n)}
            targets = {mb: torch.randn(ROWS, HIDDEN) for mb in range(n)}

            def run_step(runner=runner, inputs=inputs, targets=targets):
                runner.step(inputs, targets, nn.functional.mse_loss)

        best, action_s = None, {}
        for _ in range(args.repeat + 1):  # the first step warms up
            dist.barrier()
            started = time.perf_counter()
            run_step()
            ended = time.perf_counter()
            dist.barrier()
            step_s = torch.tensor([ended - started])
            idle = torch.tensor([1.0 - log.busy_s(started) / (ended - started),
                                 1.0 - log.busy_s(started, ("compute", "exchange")) / (ended - started)])
            dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
            dist.all_reduce(idle)
            measured = (float(step_s), float(idle[0]) / world, float(idle[1]) / world)
            if best is None or measured[0] < best[0]:
                best = measured
                action_s = {} if name in TORCH else {k: (sum(v), len(v)) for k, v in runner.action_s.items()}
                exposed = {} if name in TORCH else _exposed_by_kind(log, runner.action_spans)
        results[name] = {"step_s": best[0], "idle_ratio": best[1], "bubble_ratio": best[2], "action_s": action_s,
                         "exposed_exchange_s": exposed}
    return results


TWIN = {"torch_1f1b": "1f1b", "torch_dualpipev": "dualpipev_serial"}  # ours with the same actions


def _schedule_of(name, args):
    sched_name = OURS[TWIN.get(name, name)]
    return build_schedule(sched_name, args.pp, args.microbatches)


def _nominal_costs(name, args, a2a_s) -> Costs:
    """The stage's sleeps plus the exchange's time alone. An F&B pair computes its halves one after
    the other (one device); overlapped, each half's exchange hides behind the other's compute at
    best (F + B + W), serial it adds both exchanges."""
    scale = 0.5 if name in HALF_STAGES else 1.0
    f, b, w = (c * scale for c in (args.f, args.b, args.w))
    fa, ba = f + a2a_s, b + a2a_s
    overlap = name in OURS and not name.endswith("_serial")
    return Costs(fa, ba, w, fb=f + b + w if overlap else fa + ba + w)


def _calibrated_costs(action_s) -> Optional[Costs]:
    """Each action kind's mean busy time in the measured step, over all ranks."""
    if not action_s:
        return None
    mean = {k: total / count for k, (total, count) in action_s.items()}
    w = mean.get("W", 0.0)
    b = mean["B"] if "B" in mean else mean["BW"] - w
    return Costs(mean["F"], b, w, fb=mean.get("FB"))


def _sum_action_s(per_rank):
    out = {}
    for action_s in per_rank:
        for kind, (total, count) in action_s.items():
            t, c = out.get(kind, (0.0, 0))
            out[kind] = (t + total, c + count)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=16)
    parser.add_argument("--f", type=float, default=0.02)
    parser.add_argument("--b", type=float, default=0.02)
    parser.add_argument("--w", type=float, default=0.01)
    parser.add_argument("--a2a-kib", type=int, default=2048, help="all-to-all payload per rank per full stage")
    parser.add_argument("--exchange-at", type=float, default=0.5,
                        help="where the exchange sits in a chunk's forward, as a fraction of F (backward: 1 - this of B)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--schedules", nargs="+", default=[*OURS, *TORCH])
    args = parser.parse_args()
    measured = run_ranks(args.pp * args.ep, _worker, args, timeout=1800)
    a2a = {size: max(m["a2a_alone_s"][size] for m in measured) for size in ("full", "half")}  # slowest rank
    out = {"torch": torch.__version__, "ranks": args.pp * args.ep, "pp": args.pp, "ep": args.ep,
           "microbatches": args.microbatches, "costs_s": {"f": args.f, "b": args.b, "w": args.w},
           "a2a_kib": args.a2a_kib, "exchange_at": args.exchange_at, "a2a_alone_s": {"full_stage": round(a2a["full"], 4),
                                                     "half_stage": round(a2a["half"], 4)},
           "schedules": {}}
    for name in args.schedules:
        m = measured[0][name]
        sched = _schedule_of(name, args)
        nominal = simulate(sched, _nominal_costs(name, args, a2a["half" if name in HALF_STAGES else "full"]))
        calibrated = _calibrated_costs(_sum_action_s(r[TWIN.get(name, name)]["action_s"] for r in measured
                                                     if TWIN.get(name, name) in r))
        row = {"measured_step_s": round(m["step_s"], 4), "nominal_simulated_step_s": round(nominal.makespan, 4),
               "measured_idle_ratio": round(m["idle_ratio"], 3),
               "measured_idle_s": round(m["step_s"] * m["idle_ratio"], 4),
               "measured_bubble_ratio": round(m["bubble_ratio"], 3),
               "measured_bubble_s": round(m["step_s"] * m["bubble_ratio"], 4),
               "nominal_simulated_bubble_ratio": round(nominal.bubble_ratio, 3)}
        if m["exposed_exchange_s"]:  # mean over ranks, by action kind
            row["exposed_exchange_s_by_kind"] = {k: round(sum(r[name]["exposed_exchange_s"].get(k, 0.0)
                                                              for r in measured) / len(measured), 4)
                                                 for k in m["exposed_exchange_s"]}
        if calibrated is not None:
            sim = simulate(sched, calibrated)
            row.update(calibrated_costs_s={k: round(v, 4) for k, v in vars(calibrated).items() if v},
                       simulated_step_s=round(sim.makespan, 4), measured_over_simulated=round(m["step_s"] / sim.makespan, 3),
                       simulated_bubble_ratio=round(sim.bubble_ratio, 3))
        out["schedules"][name] = row
    s = out["schedules"]
    if "torch_1f1b" in s and "dualpipe" in s:
        for key in ("idle_s", "bubble_s"):
            out[f"dualpipe_{key}_over_torch_1f1b"] = round(s["dualpipe"][f"measured_{key}"] /
                                                           s["torch_1f1b"][f"measured_{key}"], 3)
    if "torch_dualpipev" in s and "dualpipev" in s:
        out["dualpipev_step_over_torch_dualpipev"] = round(s["dualpipev"]["measured_step_s"] /
                                                           s["torch_dualpipev"]["measured_step_s"], 3)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
