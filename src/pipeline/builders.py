"""One builder per schedule: (ranks, micro-batches) -> Schedule.

- 1F1B (PipeDream-Flush): warm-up forwards, then one forward / one backward, then drain.
- Interleaved 1F1B (Megatron-LM): v chunks per rank, stage c * P + r on rank r; forwards walk the
  chunks in groups of P micro-batches, with (P - r - 1) * 2 + (v - 1) * P warm-up forwards.
- ZB1P (zero bubble ZB-H1, Qi et al. 2023): 1F1B with the backward split into B and W; rank r lets
  its weight gradients lag their B by r positions, so the input gradients race up the pipeline and
  the W's fill the drain, at 1F1B's activation peak.
- DualPipeV (DeepSeek, after Sea AI Lab's "cut-in-half"): P ranks hold 2P stages in a V, rank r
  running stages r and 2P-1-r; eight phases per rank (reference/deepseek-v3.md section 1):
  F0 x 2(P-r-1); (F0 F1) x (r+1); (B1 W F1) x (P-r-1); (F0&B1, F1&B0) x (N-2P+r+1);
  (B1, F1&B0) x (P-r-1); (B1 B0) x (r+1), the second half with deferred W; (W B0) x (P-r-1); W x (r+1).
- DualPipe: P (even) ranks, micro-batches fed from both ends: half flow along stages on ranks
  0..P-1, half along ranks P-1..0. Rank r runs the DualPipeV phases with h = min(r, P-1-r) for r,
  P/2 ranks and N/2 micro-batches, chunk 0 being the direction in which it is the shallower stage.
"""
from __future__ import annotations

from collections import deque
from dataclasses import replace

from moetron.pipeline.schedule import Action, ActionKind, Schedule, ScheduleError


class MinimumMicrobatches(ScheduleError):
    """Too few micro-batches (or ranks of the wrong parity) for a schedule."""


def build_1f1b(num_ranks: int, num_microbatches: int) -> Schedule:
    P, N = num_ranks, num_microbatches
    if N < 1:
        raise MinimumMicrobatches("1f1b needs at least 1 micro-batch")
    sched = Schedule("1f1b", P, N, chains=[list(range(P))], rank_of_stage={s: s for s in range(P)}, chain_of_mb=[0] * N)
    for r in range(P):
        warm = min(P - r - 1, N)
        acts = [Action(ActionKind.F, i, r) for i in range(warm)]
        for i in range(N - warm):
            acts += [Action(ActionKind.F, warm + i, r), Action(ActionKind.BW, i, r)]
        acts += [Action(ActionKind.BW, i, r) for i in range(N - warm, N)]
        sched.actions.append(acts)
    return sched


def build_zb1p(num_ranks: int, num_microbatches: int) -> Schedule:
    """1F1B's order with every full backward split: B at once, its W lagging r positions on rank r."""
    base = build_1f1b(num_ranks, num_microbatches)
    actions = []
    for r, acts in enumerate(base.actions):
        out, lagging = [], deque()
        for a in acts:
            if a.kind != ActionKind.BW:
                out.append(a)
                continue
            out.append(Action(ActionKind.B, a.mb, r))
            lagging.append(a.mb)
            while len(lagging) > r:
                out.append(Action(ActionKind.W, lagging.popleft(), r))
        actions.append(out + [Action(ActionKind.W, mb, r) for mb in lagging])
    return replace(base, name="zb1p", actions=actions)


def build_interleaved_1f1b(num_ranks: int, num_microbatches: int, chunks: int = 2) -> Schedule:
    P, N, v = num_ranks, num_microbatches, chunks
    if N % P or N < P:
        raise MinimumMicrobatches(f"interleaved 1f1b on {P} ranks needs a multiple of {P} micro-batches, got {N}")
    stages = v * P
    sched = Schedule("interleaved_1f1b", P, N, chains=[list(range(stages))],
                     rank_of_stage={s: s % P for s in range(stages)}, chain_of_mb=[0] * N)

    def unit(k: int, backward: bool, r: int) -> tuple[int, int]:
        chunk = (k // P) % v
        if backward:
            chunk = v - 1 - chunk
        return (k // (P * v)) * P + k % P, chunk * P + r

    total = N * v
    for r in range(P):
        warm = min((P - r - 1) * 2 + (v - 1) * P, total)
        acts = [Action(ActionKind.F, *unit(k, False, r)) for k in range(warm)]
        for k in range(total - warm):
            acts += [Action(ActionKind.F, *unit(warm + k, False, r)), Action(ActionKind.BW, *unit(k, True, r))]
        acts += [Action(ActionKind.BW, *unit(k, True, r)) for k in range(total - warm, total)]
        sched.actions.append(acts)
    return sched


class _DualRank:
    """Emits one rank's DualPipe(V) phases; chunk c runs `stages[c]` on micro-batches from `first_mb[c]`."""

    def __init__(self, stages: tuple[int, int], first_mb: tuple[int, int]) -> None:
        self.stages = stages
        self.next_f = list(first_mb)
        self.next_b = list(first_mb)
        self.deferred: deque = deque()
        self.acts: list[Action] = []

    def f(self, c: int) -> None:
        self.acts.append(Action(ActionKind.F, self.next_f[c], self.stages[c]))
        self.next_f[c] += 1

    def b(self, c: int, defer_w: bool) -> None:
        mb, stage = self.next_b[c], self.stages[c]
        self.acts.append(Action(ActionKind.B if defer_w else ActionKind.BW, mb, stage))
        if defer_w:
            self.deferred.append((mb, stage))
        self.next_b[c] += 1

    def w(self) -> None:
        mb, stage = self.deferred.popleft()
        self.acts.append(Action(ActionKind.W, mb, stage))

    def fb(self, cf: int, cb: int) -> None:
        self.acts.append(Action(ActionKind.FB, self.next_f[cf], self.stages[cf], self.next_b[cb], self.stages[cb]))
        self.next_f[cf] += 1
        self.next_b[cb] += 1

    def phases(self, P: int, r: int, N: int) -> list[Action]:
        """The eight phases of rank r among P, with N micro-batches through each chunk."""
        for _ in range(2 * (P - r - 1)):
            self.f(0)
        for _ in range(r + 1):
            self.f(0)
            self.f(1)
        for _ in range(P - r - 1):  # zero bubble: the weight gradient fills the wait for the next forward
            self.b(1, defer_w=True)
            self.w()
            self.f(1)
        for i in range(N - 2 * P + r + 1):
            if i == 0 and r == P - 1:  # the turning rank: F0 then B1, not overlapped, to shorten the bubble
                self.f(0)
                self.b(1, defer_w=False)
            else:
                self.fb(0, 1)
            self.fb(1, 0)
        for _ in range(P - r - 1):
            self.b(1, defer_w=False)
            self.fb(1, 0)
        defer = False
        for i in range(r + 1):  # the second half of these backwards defer their weight gradients
            if i == (r + 1) // 2 and r % 2 == 1:
                defer = True
            self.b(1, defer)
            if i == (r + 1) // 2 and r % 2 == 0:
                defer = True
            self.b(0, defer)
        for _ in range(P - r - 1):
            self.w()
            self.b(0, defer_w=True)
        for _ in range(r + 1):
            self.w()
        assert not self.deferred
        return self.acts


def build_dualpipev(num_ranks: int, num_microbatches: int) -> Schedule:
    P, N = num_ranks, num_microbatches
    if N < 2 * P:
        raise MinimumMicrobatches(f"dualpipev on {P} ranks needs at least {2 * P} micro-batches, got {N}")
    rank_of_stage = {s: (s if s < P else 2 * P - 1 - s) for s in range(2 * P)}
    sched = Schedule("dualpipev", P, N, chains=[list(range(2 * P))], rank_of_stage=rank_of_stage, chain_of_mb=[0] * N)
    for r in range(P):
        sched.actions.append(_DualRank((r, 2 * P - 1 - r), (0, 0)).phases(P, r, N))
    return sched


def build_dualpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    P, N = num_ranks, num_microbatches
    if P % 2:
        raise MinimumMicrobatches(f"dualpipe needs an even number of ranks, got {P}")
    if N % 2 or N < 2 * P:
        raise MinimumMicrobatches(f"dualpipe on {P} ranks needs an even number of at least {2 * P} micro-batches, got {N}")
    half = N // 2
    # direction d, depth k -> stage d * P + k, on rank k (d = 0) or P - 1 - k (d = 1)
    chains = [list(range(P)), list(range(P, 2 * P))]
    rank_of_stage = {k: k for k in range(P)} | {P + k: P - 1 - k for k in range(P)}
    sched = Schedule("dualpipe", P, N, chains=chains, rank_of_stage=rank_of_stage, chain_of_mb=[0] * half + [1] * half,
                     module_of_stage={s: s % P for s in range(2 * P)})  # a stage and its mirror: one module
    for r in range(P):
        h = min(r, P - 1 - r)
        if r < P // 2:  # shallow in direction 0
            stages, first = (r, P + (P - 1 - r)), (0, half)
        else:
            stages, first = (P + (P - 1 - r), r), (half, 0)
        sched.actions.append(_DualRank(stages, first).phases(P // 2, h, half))
    return sched


PAIRED = ("dualpipe", "dualpipev")  # schedules with F&B pairs, whose halves communicate at once


def comm_lanes(schedule: str, pp: int, overlap_fb: bool = True) -> int:
    """Copies of the communication groups a rank needs (moetron.comm.lanes): two where F&B pairs
    overlap a forward with a backward."""
    return 2 if pp > 1 and schedule in PAIRED and overlap_fb else 1


BUILDERS = {"1f1b": build_1f1b, "interleaved_1f1b": build_interleaved_1f1b, "zb1p": build_zb1p,
            "dualpipe": build_dualpipe, "dualpipev": build_dualpipev}


def build_schedule(name: str, num_ranks: int, num_microbatches: int) -> Schedule:
    if name not in BUILDERS:
        raise ValueError(f"parallel.schedule={name!r}: choose one of {sorted(BUILDERS)}")
    return BUILDERS[name](num_ranks, num_microbatches)
