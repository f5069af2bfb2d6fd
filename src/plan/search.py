"""The layouts the planner tries: every pp, ep, schedule, micro-batch size, recompute policy and
precision that divides the cluster and the batch, minus what Hydra overrides fix. A layout's memory
is checked before its step is simulated; the table ranks those that fit by GPU-hours."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Optional

from moetron.plan.estimate import Layout, schedule_of

SCHEDULES = ("1f1b", "interleaved_1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass
class Fixed:
    """What the user's overrides fix (None: searched)."""
    pp: Optional[int] = None
    ep: Optional[int] = None
    dp: Optional[int] = None
    schedule: Optional[str] = None
    micro_batch: Optional[int] = None
    recompute: Optional[bool] = None
    fp8: Optional[bool] = None


def _powers_of_two_dividing(n: int) -> list[int]:
    return [2 ** k for k in range(n.bit_length()) if n % (2 ** k) == 0]


def _schedule_fits(name: str, pp: int, n: int, decoder_layers: int) -> bool:
    try:
        sched = schedule_of(name, pp, n)
    except ValueError:  # too few micro-batches, an odd count for dualpipe, ...
        return False
    return len(sched.chains[0]) <= decoder_layers  # a decoder layer at least per stage


def layouts(world: int, decoder_layers: int, n_experts: int, global_batch: int, fixed: Fixed,
            micro_batches=(1, 2, 4)) -> Iterator[Layout]:
    pps = [fixed.pp] if fixed.pp else [p for p in range(1, decoder_layers + 1)
                                       if world % p == 0 and (p == 1 or p % 2 == 0)]
    for pp in pps:
        eps = [fixed.ep] if fixed.ep else [e for e in _powers_of_two_dividing(world // pp) if n_experts % e == 0]
        for ep in eps:
            if world % (pp * ep):
                continue
            dp = world // (pp * ep)
            replicas = dp * ep  # ranks of one stage, each on its own share of the batch
            if (fixed.dp and dp != fixed.dp) or global_batch % replicas:
                continue
            for mb in [fixed.micro_batch] if fixed.micro_batch else micro_batches:
                if (global_batch // replicas) % mb:
                    continue
                n = global_batch // replicas // mb
                schedules = [fixed.schedule] if fixed.schedule else (SCHEDULES if pp > 1 else ("1f1b",))
                for sched in schedules:
                    if pp > 1 and not _schedule_fits(sched, pp, n, decoder_layers):
                        continue
                    recomputes = [fixed.recompute] if fixed.recompute is not None else [False, True]
                    fp8s = [fixed.fp8] if fixed.fp8 is not None else [False, True]
                    for recompute, fp8 in itertools.product(recomputes, fp8s):
                        yield Layout(pp, ep, dp, sched if pp > 1 else "1f1b", mb, n, recompute, fp8)
