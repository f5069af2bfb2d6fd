"""Pipeline schedules on 8 gloo ranks with stages of controlled cost, measured against the simulator.

    python benchmarks/cpu/pipeline.py --ranks 8 --microbatches 16 --f 0.02 --b 0.02 --w 0.01

Each stage is a tiny linear layer plus a timed section: the forward sleeps F seconds, the input
backward B, the weight backward W (halved where the schedule cuts the same model into 2 x ranks
stages: interleaved 1F1B and DualPipeV) (deferred to the W action when the schedule splits them). Sleeping
keeps 8 ranks honest on a 2-core machine: the cost is wall time, not contended CPU. Real P2P moves
the activations between ranks. For every schedule one step is timed (after a warm-up step) and
printed beside the simulator's prediction for the same costs; the bubble ratio is measured as each
rank's idle share of the step (compute timed apart from receive waits), averaged over ranks.

Results: benchmarks/BENCHMARKS.md. Not yet here (see the pipeline issue): an all-to-all inside each
chunk, F&B overlap, and torch.distributed.pipelining's schedules run on the same stages.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from moetron.parallel.local_ranks import run_ranks
from moetron.pipeline.builders import build_schedule
from moetron.pipeline.runtime import PipelineRunner
from moetron.pipeline.simulate import Costs, simulate

HIDDEN, ROWS = 64, 4
HALF_STAGES = ("interleaved_1f1b", "dualpipev")  # two stages per rank along one chain


class _Timed(torch.autograd.Function):
    """Identity whose forward sleeps f, backward b, and weight part w (queued while the store defers)."""

    @staticmethod
    def forward(ctx, x, costs, store):
        ctx.costs, ctx.store = costs, store
        time.sleep(costs[0])
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        f, b, w = ctx.costs
        time.sleep(b)
        if ctx.store is not None and ctx.store.enabled:
            ctx.store.put(lambda: time.sleep(w))
        else:
            time.sleep(w)
        return grad, None, None


class TimedStage(nn.Module):
    def __init__(self, costs: tuple[float, float, float]) -> None:
        super().__init__()
        self.linear = nn.Linear(HIDDEN, HIDDEN)
        self.costs = costs
        self.weight_grad_store = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Timed.apply(self.linear(x), self.costs, self.weight_grad_store)


def _worker(rank, world, args):
    torch.set_num_threads(1)
    results = {}
    for name in args.schedules:
        ranks = world
        sched = build_schedule(name, ranks, args.microbatches)
        costs = (args.f, args.b, args.w)
        if name in HALF_STAGES:  # the same model cut into 2 x ranks stages: each costs half
            costs = tuple(c / 2 for c in costs)
        modules = {s: TimedStage(costs) for s, r in sched.stage_rank.items() if r == rank}
        runner = PipelineRunner(sched, rank, modules, None, (ROWS, HIDDEN))
        inputs = {mb: torch.randn(ROWS, HIDDEN) for mb in range(args.microbatches)}
        targets = {mb: torch.randn(ROWS, HIDDEN) for mb in range(args.microbatches)}
        step_s = []
        for _ in range(args.repeat + 1):
            dist.barrier()
            t0 = time.perf_counter()
            runner.step(inputs, targets, nn.functional.mse_loss)
            dist.barrier()
            step_s.append(time.perf_counter() - t0)
        idle = torch.tensor([1.0 - runner.busy_s / runner.step_s])
        dist.all_reduce(idle)
        results[name] = {"step_s": min(step_s[1:]), "bubble_ratio": float(idle) / world}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=16)
    parser.add_argument("--f", type=float, default=0.02)
    parser.add_argument("--b", type=float, default=0.02)
    parser.add_argument("--w", type=float, default=0.01)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "interleaved_1f1b", "zb1p", "dualpipe", "dualpipev"])
    args = parser.parse_args()
    measured = run_ranks(args.ranks, _worker, args, timeout=1800)[0]
    out = {"torch": torch.__version__, "ranks": args.ranks, "microbatches": args.microbatches,
           "costs_s": {"f": args.f, "b": args.b, "w": args.w}, "schedules": {}}
    for name, m in measured.items():
        sched = build_schedule(name, args.ranks, args.microbatches)
        f, b, w = (args.f, args.b, args.w) if name not in HALF_STAGES else (args.f / 2, args.b / 2, args.w / 2)
        sim = simulate(sched, Costs(f, b, w, fb=f + b + w))  # F&B pairs run one after the other here
        out["schedules"][name] = {"measured_step_s": round(m["step_s"], 4), "simulated_step_s": round(sim.makespan, 4),
                                  "measured_over_simulated": round(m["step_s"] / sim.makespan, 3),
                                  "measured_bubble_ratio": round(m["bubble_ratio"], 3),
                                  "simulated_bubble_ratio": round(sim.bubble_ratio, 3)}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
