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
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist


def current_lane() -> int:
    """1 while an autograd backward pass is running on this thread, else 0."""
    return 1 if torch._C._current_graph_task_id() != -1 else 0  # what torch.utils.checkpoint also reads


class LaneGroup:
    """One process group per lane (all copies of the same ranks); None stands for a single rank."""

    def __init__(self, groups: Sequence[Optional[dist.ProcessGroup]]) -> None:
        self.groups = list(groups)

    def resolve(self) -> Optional[dist.ProcessGroup]:
        return self.groups[min(current_lane(), len(self.groups) - 1)]


GroupLike = Union[None, dist.ProcessGroup, LaneGroup]


def resolve(group: GroupLike) -> Optional[dist.ProcessGroup]:
    """The process group a collective should use now: the lane copy for a forward or a backward."""
    return group.resolve() if isinstance(group, LaneGroup) else group
