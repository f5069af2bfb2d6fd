"""A pipeline schedule as data: for each rank, the ordered list of compute actions it runs.

A micro-batch flows along a *chain* of stages (one chain for 1F1B and DualPipeV, two opposite
chains for DualPipe). Action kinds (`ActionKind`), each on (micro-batch, stage):

- `F`  forward;
- `B`  backward for the stage's input only (its weight gradient deferred to a later `W`);
- `W`  the deferred weight gradient of an earlier `B`;
- `BW` full backward (input and weight gradients at once);
- `FB` an overlapped pair: forward of (mb, stage) with the full backward of (mb2, stage2), so one
  micro-batch's communication hides behind the other's compute (DualPipe's F&B).

Stages are positions along a chain; `module_of_stage` says which stage module runs one (DualPipe's
two chains run the same modules in opposite directions, so stage s and its mirror share one).
Point-to-point transfers follow from the chain: an action whose predecessor ran on another rank
receives from it. `moetron.pipeline.transfers` inserts them as SEND/RECV actions (and checks that
they pair up); the simulator reads the compute lists, the runtime the lists with transfers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional


class ScheduleError(ValueError):
    """A schedule that cannot run: too few micro-batches, a deadlock, transfers that do not pair up."""


class ActionKind(str, Enum):
    F = "F"
    B = "B"
    W = "W"
    BW = "BW"
    FB = "FB"
    SEND_F = "SEND_F"  # transfers, inserted by moetron.pipeline.transfers
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    def __str__(self) -> str:
        return self.value

    @property
    def is_transfer(self) -> bool:
        return self.name.startswith(("SEND", "RECV"))


TRANSFER_KINDS = (ActionKind.SEND_F, ActionKind.RECV_F, ActionKind.SEND_B, ActionKind.RECV_B)


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    mb: int
    stage: int
    mb2: int = -1  # FB only: the backward's micro-batch and stage
    stage2: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ActionKind(self.kind))  # "F" and ActionKind.F alike

    def __str__(self) -> str:
        if self.kind == ActionKind.FB:
            return f"F{self.mb}.{self.stage}&B{self.mb2}.{self.stage2}"
        return f"{self.kind}{self.mb}.{self.stage}"


@dataclass
class Schedule:
    name: str
    num_ranks: int
    num_microbatches: int
    chains: list[list[int]]  # stage ids of each chain, first to last
    rank_of_stage: dict[int, int]  # which pipeline rank runs a stage
    chain_of_mb: list[int]  # which chain a micro-batch flows along
    actions: list[list[Action]] = field(default_factory=list)  # per rank, in execution order
    module_of_stage: dict[int, int] = field(default_factory=dict)  # stage -> stage module; default: itself

    def __post_init__(self) -> None:
        if not self.module_of_stage:
            self.module_of_stage = {s: s for s in self.rank_of_stage}

    @property
    def num_modules(self) -> int:
        """Distinct stage modules the model is cut into."""
        return len(set(self.module_of_stage.values()))

    def stages_on(self, rank: int) -> list[int]:
        """The stages a pipeline rank runs, in stage order."""
        return sorted(s for s, r in self.rank_of_stage.items() if r == rank)

    def last_stages(self) -> set[int]:
        """The stages whose output goes to the loss (one per chain)."""
        return {chain[-1] for chain in self.chains}

    def prev_stage(self, mb: int, stage: int) -> Optional[int]:
        chain = self.chains[self.chain_of_mb[mb]]
        i = chain.index(stage)
        return chain[i - 1] if i > 0 else None

    def next_stage(self, mb: int, stage: int) -> Optional[int]:
        chain = self.chains[self.chain_of_mb[mb]]
        i = chain.index(stage)
        return chain[i + 1] if i + 1 < len(chain) else None

    def pretty(self) -> str:
        return "\n".join(f"rank {r}: " + " ".join(str(a) for a in acts) for r, acts in enumerate(self.actions))


def splits_weight_grads(schedule: Schedule) -> bool:
    """Whether the schedule defers weight gradients to W actions (ZB1P, DualPipe, DualPipeV)."""
    return any(a.kind == ActionKind.W for rank_actions in schedule.actions for a in rank_actions)


def forward_only(schedule: Schedule) -> Schedule:
    """The schedule's forwards alone, in each rank's order (an F&B pair keeps its forward half): what
    an evaluation runs. Dropping backwards removes waits, never adds one, so it cannot deadlock."""
    actions = [[Action(ActionKind.F, a.mb, a.stage) for a in rank_actions if a.kind in (ActionKind.F, ActionKind.FB)]
               for rank_actions in schedule.actions]
    return dataclasses.replace(schedule, name=f"{schedule.name}-forward", actions=actions)
