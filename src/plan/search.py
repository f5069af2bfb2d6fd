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
    cp: Optional[int] = None
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


def context_sizes(world: int, seq_len: int) -> list[int]:
    """cp sizes > 1 to try: every power of two that cuts the sequence into 2 x cp chunks of at
    least 1,024 tokens (shorter ones gather more than they save)."""
    return [c for c in _powers_of_two_dividing(world)[1:] if seq_len % (2 * c) == 0 and seq_len // (2 * c) >= 1024]


def _split(world: int, pp: int, ep: int, cps: list[int], fixed: Fixed, n_experts: int) -> Iterator[tuple[int, int]]:
    """(cp, dp) pairs that fill the ranks left to each pipeline stage's ep groups."""
    for cp in cps:
        if world % (pp * ep * cp) == 0 and (not fixed.dp or world // (pp * ep * cp) == fixed.dp) \
                and n_experts % (ep * cp) == 0:  # the experts are sharded over ep x cp ranks
            yield cp, world // (pp * ep * cp)


def layouts(world: int, decoder_layers: int, n_experts: int, global_batch: int, fixed: Fixed,
            micro_batches=(1, 2, 4), cps: tuple[int, ...] = (1,)) -> Iterator[Layout]:
    """`cps`: the context-parallel sizes to try (`context_sizes`)."""
    pps = [fixed.pp] if fixed.pp else [p for p in range(1, decoder_layers + 1)
                                       if world % p == 0 and (p == 1 or p % 2 == 0)]
    for pp in pps:
        eps = [fixed.ep] if fixed.ep else [e for e in _powers_of_two_dividing(world // pp) if n_experts % e == 0]
        for ep, (cp, dp) in ((e, split) for e in eps for split in _split(world, pp, e, cps, fixed, n_experts)):
            replicas = dp * ep  # ranks of one stage that read their own sequences (cp ranks share theirs)
            if global_batch % replicas:
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
                        yield Layout(pp, ep, dp, sched if pp > 1 else "1f1b", mb, n, recompute, fp8, cp=cp)
