"""Point-to-point transfers made explicit: each rank's compute list with its sends and receives.

A compute action whose input comes from another rank needs a receive, one whose output goes to
another rank a send. `with_transfers` inserts them, on (micro-batch, stage) like the compute:

- `SEND_F` (mb, s): the activation stage s produced, to the rank of the next stage;
- `RECV_F` (mb, s): the activation stage s consumes, from the rank of the previous stage;
- `SEND_B` (mb, s): the gradient of stage s's input, to the rank of the previous stage;
- `RECV_B` (mb, s): the gradient of stage s's output, from the rank of the next stage.

Sends follow their producer at once. Receives are posted one compute action ahead of their consumer
(a posted receive does not block: the data can land while the action before it computes). The
runtime posts every transfer from one thread in list order, activations and gradients on
separate communicators; since NCCL matches a rank pair's transfers by order, not by tag,
`check_transfers` verifies that every send has its receive and that, per (sender, receiver,
kind), both ends list them in the same order.
"""
from __future__ import annotations

from collections import defaultdict

from moetron.pipeline.schedule import TRANSFER_KINDS, Action, ActionKind, Schedule, ScheduleError

K = ActionKind


def _forward_halves(a: Action) -> list[tuple[int, int]]:
    return [(a.mb, a.stage)] if a.kind in (K.F, K.FB) else []


def _backward_halves(a: Action) -> list[tuple[int, int]]:
    if a.kind in (K.B, K.BW):
        return [(a.mb, a.stage)]
    return [(a.mb2, a.stage2)] if a.kind == K.FB else []


def _remote(sched: Schedule, rank: int, stage) -> bool:
    return stage is not None and sched.rank_of_stage[stage] != rank


def with_transfers(sched: Schedule) -> list[list[Action]]:
    """Every rank's actions with SEND_*/RECV_* inserted (compute actions keep their order)."""
    lowered = []
    for rank, acts in enumerate(sched.actions):
        receives: list[list[Action]] = [[] for _ in acts]  # posted before compute action i
        sends: list[list[Action]] = [[] for _ in acts]  # after compute action i
        for i, a in enumerate(acts):
            post_at = max(i - 1, 0)
            for mb, stage in _forward_halves(a):
                if _remote(sched, rank, sched.prev_stage(mb, stage)):
                    receives[post_at].append(Action(K.RECV_F, mb, stage))
                if _remote(sched, rank, sched.next_stage(mb, stage)):
                    sends[i].append(Action(K.SEND_F, mb, stage))
            for mb, stage in _backward_halves(a):
                if _remote(sched, rank, sched.next_stage(mb, stage)):
                    receives[post_at].append(Action(K.RECV_B, mb, stage))
                if _remote(sched, rank, sched.prev_stage(mb, stage)):
                    sends[i].append(Action(K.SEND_B, mb, stage))
        out: list[Action] = []
        for i, a in enumerate(acts):
            out += receives[i] + [a] + sends[i]
        lowered.append(out)
    return lowered


def peer_stage(sched: Schedule, a: Action) -> int:
    """The stage at the other end of a transfer action: the next stage for SEND_F and RECV_B, the
    previous one for RECV_F and SEND_B."""
    if a.kind in (K.SEND_F, K.RECV_B):
        return sched.next_stage(a.mb, a.stage)
    return sched.prev_stage(a.mb, a.stage)


def transfer_route(sched: Schedule, rank: int, a: Action) -> tuple[int, int, str]:
    """(sender rank, receiver rank, "F" or "B") of a transfer action on `rank`."""
    peer = sched.rank_of_stage[peer_stage(sched, a)]
    return (rank, peer, a.kind[-1]) if a.kind in (K.SEND_F, K.SEND_B) else (peer, rank, a.kind[-1])


def check_transfers(sched: Schedule, lowered: list[list[Action]]) -> None:
    """Raise ScheduleError unless sends and receives pair up in the same order at both ends."""
    sent, received = defaultdict(list), defaultdict(list)
    for rank, acts in enumerate(lowered):
        for a in acts:
            if a.kind not in TRANSFER_KINDS:
                continue
            route = transfer_route(sched, rank, a)
            if a.kind in (K.SEND_F, K.SEND_B):  # a message is named by its micro-batch and the stage that receives it
                sent[route].append((a.mb, peer_stage(sched, a)))
            else:
                received[route].append((a.mb, a.stage))
    for route in sorted(set(sent) | set(received)):
        if sent[route] != received[route]:
            src, dst, direction = route
            raise ScheduleError(f"{sched.name}: rank {src} sends {direction} transfers to rank {dst} in the order "
                                f"{sent[route]} but rank {dst} receives {received[route]}")
