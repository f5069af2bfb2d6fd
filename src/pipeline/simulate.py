"""Check a schedule and cost it: makespan, per-rank bubble, peak in-flight activations.

    python -m moetron.pipeline.simulate --schedule dualpipe --pp 8 --microbatches 16 \\
        --f 1 --b 2 --w 1 --fb 3 --json --plot dualpipe.png

Each rank runs its list in order; an action starts when the rank is free and its inputs exist: a
forward needs the previous stage's forward of its micro-batch, a backward needs its own forward and
the next stage's input gradient, a W needs its B. An input from another rank arrives `comm` later.
Costs: F, B (input gradient only), W; a full backward BW costs B + W; an overlapped F&B pair costs
`fb` (default F + B + W, i.e. no overlap). Bubble of a rank = makespan - its busy time. Activations:
a (micro-batch, stage) holds one unit from the start of its forward to the end of its weight gradient.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

from moetron.pipeline.builders import build_schedule
from moetron.pipeline.schedule import Action, ActionKind, Schedule, ScheduleError


@dataclass
class Costs:
    f: float = 1.0
    b: float = 1.0
    w: float = 1.0
    fb: Optional[float] = None
    comm: float = 0.0

    def of(self, a: Action) -> float:
        if a.kind == ActionKind.F:
            return self.f
        if a.kind == ActionKind.B:
            return self.b
        if a.kind == ActionKind.W:
            return self.w
        if a.kind == ActionKind.BW:
            return self.b + self.w
        return self.fb if self.fb is not None else self.f + self.b + self.w


@dataclass
class SimResult:
    makespan: float
    bubble: list[float]
    bubble_ratio: float
    peak_activations: list[int]
    spans: list = field(default_factory=list, repr=False)  # per rank: (action, start, end), in order

    def summary(self) -> dict:
        """What the JSON output shows (the spans are drawn, not printed)."""
        return {k: v for k, v in asdict(self).items() if k != "spans"}


def _parts(a: Action):
    """(event, mb, stage) produced by an action: forward, input gradient, weight gradient."""
    if a.kind == ActionKind.F:
        return [("F", a.mb, a.stage)]
    if a.kind == ActionKind.B:
        return [("B", a.mb, a.stage)]
    if a.kind == ActionKind.W:
        return [("W", a.mb, a.stage)]
    if a.kind == ActionKind.BW:
        return [("B", a.mb, a.stage), ("W", a.mb, a.stage)]
    return [("F", a.mb, a.stage), ("B", a.mb2, a.stage2), ("W", a.mb2, a.stage2)]


def _needs(sched: Schedule, event) -> list:
    kind, mb, stage = event
    if kind == "F":
        prev = sched.prev_stage(mb, stage)
        return [] if prev is None else [("F", mb, prev)]
    if kind == "B":
        nxt = sched.next_stage(mb, stage)
        return [("F", mb, stage)] + ([] if nxt is None else [("B", mb, nxt)])
    return [("B", mb, stage)]


def validate(sched: Schedule) -> None:
    """Every (micro-batch, stage) has one F, one B and one W part, on its stage's rank; raise otherwise.
    Ordering and deadlock freedom are checked by `simulate` (which raises on a stall)."""
    seen = Counter()
    for rank, acts in enumerate(sched.actions):
        for a in acts:
            for kind, mb, stage in _parts(a):
                if sched.rank_of_stage.get(stage) != rank:
                    raise ScheduleError(f"{sched.name}: {a} on rank {rank}, but stage {stage} runs on rank "
                                        f"{sched.rank_of_stage.get(stage)}")
                if stage not in sched.chains[sched.chain_of_mb[mb]]:
                    raise ScheduleError(f"{sched.name}: {a}: micro-batch {mb} never visits stage {stage}")
                seen[(kind, mb, stage)] += 1
    for mb in range(sched.num_microbatches):
        for stage in sched.chains[sched.chain_of_mb[mb]]:
            for kind in "FBW":
                if seen[(kind, mb, stage)] != 1:
                    raise ScheduleError(f"{sched.name}: {kind} of micro-batch {mb} at stage {stage} appears "
                                        f"{seen[(kind, mb, stage)]} times, expected once")


def simulate(sched: Schedule, costs: Costs) -> SimResult:
    validate(sched)
    done: dict = {}  # event -> (finish time, rank)
    free = [0.0] * sched.num_ranks
    busy = [0.0] * sched.num_ranks
    ptr = [0] * sched.num_ranks
    held: list[list[tuple[float, int]]] = [[] for _ in range(sched.num_ranks)]  # (time, +1 / -1)
    spans: list[list] = [[] for _ in range(sched.num_ranks)]
    remaining = sum(len(a) for a in sched.actions)
    while remaining:
        progressed = False
        for r, acts in enumerate(sched.actions):
            while ptr[r] < len(acts):
                a = acts[ptr[r]]
                own = set(_parts(a))
                needs = [n for p in _parts(a) for n in _needs(sched, p) if n not in own]
                if any(n not in done for n in needs):
                    break
                start = max([free[r]] + [done[n][0] + (costs.comm if done[n][1] != r else 0.0) for n in needs])
                finish = start + costs.of(a)
                for part in _parts(a):
                    done[part] = (finish, r)
                    if part[0] == "F":
                        held[r].append((start, +1))
                    elif part[0] == "W":
                        held[r].append((finish, -1))
                free[r], busy[r] = finish, busy[r] + costs.of(a)
                spans[r].append((a, start, finish))
                ptr[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(acts[ptr[r]]) for r, acts in enumerate(sched.actions) if ptr[r] < len(acts)}
            raise ScheduleError(f"{sched.name}: deadlock, every rank waits: {stuck}")
    makespan = max(free)
    bubble = [makespan - b for b in busy]
    peaks = []
    for events in held:
        level = peak = 0
        for _, delta in sorted(events):  # at equal times a release (-1) sorts before an allocation
            level += delta
            peak = max(peak, level)
        peaks.append(peak)
    return SimResult(makespan, bubble, sum(bubble) / (makespan * sched.num_ranks), peaks, spans)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetron.pipeline.simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", required=True)
    parser.add_argument("--pp", type=int, required=True, help="pipeline ranks")
    parser.add_argument("--microbatches", type=int, required=True)
    parser.add_argument("--f", type=float, default=1.0)
    parser.add_argument("--b", type=float, default=1.0, help="backward for inputs")
    parser.add_argument("--w", type=float, default=1.0, help="backward for weights")
    parser.add_argument("--fb", type=float, default=None, help="an overlapped F&B pair (default F+B+W)")
    parser.add_argument("--comm", type=float, default=0.0, help="P2P latency between ranks")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show", action="store_true", help="print every rank's action list")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the simulated schedule as a Gantt chart")
    args = parser.parse_args(argv)
    try:
        sched = build_schedule(args.schedule, args.pp, args.microbatches)
        result = simulate(sched, Costs(args.f, args.b, args.w, args.fb, args.comm))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.show:
        print(sched.pretty(), file=sys.stderr)
    if args.plot:
        from moetron.pipeline.timeline import draw_timeline
        draw_timeline(result.spans, sched, args.plot,
                      f"{sched.name}, pp={args.pp}, {args.microbatches} micro-batches (simulated): "
                      f"bubble {result.bubble_ratio:.1%}")
    print(json.dumps(result.summary()) if args.json else json.dumps(result.summary(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
