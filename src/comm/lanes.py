"""Communication lanes: forward and backward collectives on separate copies of a process group.

DualPipe's F&B pair runs one micro-batch's forward beside another's backward, and both exchange
tokens with the same EP peers. Collectives on one group must be issued in the same order on every
member, which two concurrent passes cannot promise; so forward collectives go over lane 0 and
backward ones over lane 1, a copy of the group made up front (every rank creates the copies
alike). A rank runs one forward and one backward at a time, in the order of its schedule, which
the EP peers of a stage share: within a lane, every member issues the same sequence.

The lane is chosen when the collective is issued: 1 inside an autograd backward pass, else 0. That
holds on any thread, which matters on a GPU, where autograd runs backward on its own device
threads rather than on the thread that called backward. A `LaneGroup` with a single copy serves
both lanes (nothing runs concurrently then).

Separate communicators are not enough on NCCL: its kernels block until every member joins, so
NCCL's documentation asks that the operations of two communicators on one device be issued in the
same order on every rank, or ranks can wait on each other whenever the kernels cannot all be
resident at once (more likely with CUDA_DEVICE_MAX_CONNECTIONS=1, where every stream shares one
hardware queue); and NCCL calls from two threads should not overlap. While an F&B pair runs, an
`IssueOrder` makes the two lanes take turns, lane 0 first, one collective each; a lane that
finishes its half leaves and the other goes on alone. The resulting sequence depends only on how
many collectives each half issues, which is the same on every EP peer of a stage, so all of them
issue in one order, whatever the timing.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist


def current_lane() -> int:
    """1 while an autograd backward pass is running on this thread, else 0."""
    return 1 if torch._C._current_graph_task_id() != -1 else 0  # what torch.utils.checkpoint also reads


class IssueOrder:
    """Turns between lane 0 and lane 1 while a pair is open (see the module docstring).

    The runner opens a pair around an F&B action and each half calls `leave` when it is done;
    every collective is issued inside `turn(lane)`. Outside a pair, `turn` never waits.
    """

    def __init__(self, timeout_s: float = 1800.0) -> None:
        self.timeout_s = timeout_s  # a turn never comes: an error instead of a silent hang
        self._changed = threading.Condition()
        self._open: set[int] = set()  # lanes of the running pair that have not left
        self._next = 0  # whose turn it is while both are open

    @contextmanager
    def pair(self) -> Iterator[None]:
        with self._changed:
            self._open, self._next = {0, 1}, 0
        try:
            yield
        finally:
            with self._changed:
                self._open = set()
                self._changed.notify_all()

    def leave(self, lane: int) -> None:
        with self._changed:
            self._open.discard(lane)
            self._changed.notify_all()

    def _mine(self, lane: int) -> bool:
        return self._next == lane or len(self._open) < 2 or lane not in self._open

    @contextmanager
    def turn(self, lane: int) -> Iterator[None]:
        """Hold the turn of `lane` while one collective is issued."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._mine(lane), timeout=self.timeout_s):
                raise RuntimeError(f"lane {lane} waited {self.timeout_s:.0f} s for its turn to issue a collective: "
                                   f"lane {1 - lane} of this F&B pair neither issued one nor finished")
        try:
            yield
        finally:
            with self._changed:
                if len(self._open) == 2:
                    self._next = 1 - lane
                    self._changed.notify_all()


class LaneGroup:
    """One process group per lane (all copies of the same ranks); None stands for a single rank.
    `order`, when given, sequences the lanes' collectives during F&B pairs (shared by all groups)."""

    def __init__(self, groups: Sequence[Optional[dist.ProcessGroup]], order: Optional[IssueOrder] = None) -> None:
        self.groups = list(groups)
        self.order = order

    def resolve(self) -> Optional[dist.ProcessGroup]:
        return self.groups[min(current_lane(), len(self.groups) - 1)]


GroupLike = Union[None, dist.ProcessGroup, LaneGroup]


def resolve(group: GroupLike) -> Optional[dist.ProcessGroup]:
    """The process group a collective should use now: the lane copy for a forward or a backward."""
    return group.resolve() if isinstance(group, LaneGroup) else group


@contextmanager
def issuing(group: GroupLike) -> Iterator[Optional[dist.ProcessGroup]]:
    """The process group to issue one collective on inside the block: the calling lane's copy,
    taken in the lane's turn where the group is ordered (None: a single rank, nothing to issue)."""
    process_group = resolve(group)
    order = group.order if isinstance(group, LaneGroup) and process_group is not None else None
    with order.turn(current_lane()) if order is not None else nullcontext():
        yield process_group
