"""Pipeline schedules as data: for every rank, the ordered list of compute actions it runs.

A micro-batch flows along a *chain* of stages (one chain for 1F1B and DualPipeV, two opposite
chains for DualPipe). Action kinds, each on (micro-batch, stage):

- `F`  forward;
- `B`  backward for the stage's input only (its weight gradient deferred to a later `W`);
- `W`  the deferred weight gradient of an earlier `B`;
- `BW` full backward (input and weight gradients at once);
- `FB` an overlapped pair: forward of (mb, stage) with the full backward of (mb2, stage2), so one
  micro-batch's communication hides behind the other's compute (DualPipe's F&B).

Point-to-point transfers follow from the chain: an action whose predecessor ran on another rank
receives from it. `moetron.pipeline.transfers` inserts them as SEND/RECV actions (and checks that
they pair up); the simulator reads the compute lists, the runtime the lists with transfers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

KINDS = ("F", "B", "W", "BW", "FB")


@dataclass(frozen=True)
class Action:
    kind: str
    mb: int
    stage: int
    mb2: int = -1  # FB only: the backward's micro-batch and stage
    stage2: int = -1

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"F{self.mb}.{self.stage}&B{self.mb2}.{self.stage2}"
        return f"{self.kind}{self.mb}.{self.stage}"


@dataclass
class Schedule:
    name: str
    num_ranks: int
    num_microbatches: int
    chains: list[list[int]]  # stage ids of each chain, first to last
    stage_rank: dict[int, int]  # which rank runs a stage
    chain_of_mb: list[int]  # which chain a micro-batch flows along
    actions: list[list[Action]] = field(default_factory=list)  # per rank, in execution order

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
