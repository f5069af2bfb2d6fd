"""Communication lanes: one copy of a process group per thread that issues collectives at once.

DualPipe's F&B pair runs one micro-batch's forward beside another's backward, and both exchange
tokens with the same EP peers. Collectives on one group must be issued in the same order on every
member, which two threads racing cannot promise; so each thread talks on its own lane, a copy of
the group made up front (every rank creates the copies alike). Within a lane the order is fixed by
the schedule, which the EP peers of a stage share.

`LaneGroup` holds one group per lane and `resolve` picks the calling thread's lane when the
collective is issued, not when the layer was built: the all-to-all in a backward pass runs in the
thread that calls backward (autograd runs CPU work there), so it lands on that thread's lane.

    with use_lane(1):
        loss.backward()  # every all-to-all inside goes over the lane-1 copies
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch.distributed as dist

_state = threading.local()


def current_lane() -> int:
    """The calling thread's lane (0 unless `use_lane` says otherwise)."""
    return getattr(_state, "lane", 0)


@contextmanager
def use_lane(lane: int) -> Iterator[None]:
    """Issue this thread's lane-aware collectives on lane `lane` inside the block."""
    previous = current_lane()
    _state.lane = lane
    try:
        yield
    finally:
        _state.lane = previous


class LaneGroup:
    """One process group per lane (all copies of the same ranks); None stands for a single rank."""

    def __init__(self, groups: Sequence[Optional[dist.ProcessGroup]]) -> None:
        self.groups = list(groups)

    def resolve(self) -> Optional[dist.ProcessGroup]:
        lane = current_lane()
        if lane >= len(self.groups):
            raise RuntimeError(f"lane {lane} was not created: this group has {len(self.groups)} lane(s)")
        return self.groups[lane]


GroupLike = Union[None, dist.ProcessGroup, LaneGroup]


def resolve(group: GroupLike) -> Optional[dist.ProcessGroup]:
    """The process group a collective should use now, from the calling thread's lane."""
    return group.resolve() if isinstance(group, LaneGroup) else group
