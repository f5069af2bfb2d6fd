"""The global batch of a step under a batch-size ramp (DeepSeek-V3, report section 4.2: 3072 to
15360 sequences over the first 469B tokens, then 15360).

`train.batch_ramp=[start, increment, tokens]` (Megatron-LM's rampup_batch_size, in tokens): the batch
starts at `start` and grows by `increment` in equal shares of the first `tokens` tokens until it
reaches `train.global_batch`. It depends on the tokens trained so far only, so a resumed run, in any
layout, takes the same batches; a step's first sequence is the tokens before it / `train.seq_len`.
"""
from __future__ import annotations

from typing import Any, Optional


def global_batch_at(tokens: float, global_batch: int, ramp: Optional[list[Any]]) -> int:
    """Sequences in the step that starts after `tokens` tokens."""
    if not ramp:
        return global_batch
    start, increment, ramp_tokens = int(ramp[0]), int(ramp[1]), float(ramp[2])
    increments = (global_batch - start) // increment
    done = int(tokens // (ramp_tokens / increments)) if increments else 0
    return min(start + increment * done, global_batch)


def ramp_batches(global_batch: int, ramp: Optional[list[Any]]) -> list[int]:
    """Every global batch a run takes, first to last."""
    if not ramp:
        return [global_batch]
    start, increment = int(ramp[0]), int(ramp[1])
    return list(range(start, global_batch, increment)) + [global_batch]


def ramp_problems(global_batch: int, ramp: Optional[list[Any]]) -> list[str]:
    if ramp is None:
        return []
    ok = isinstance(ramp, list) and len(ramp) == 3 and all(isinstance(v, (int, float)) for v in ramp)
    if not ok or int(ramp[0]) != ramp[0] or int(ramp[1]) != ramp[1]:
        return [f"train.batch_ramp={ramp!r} must be [start, increment, tokens], e.g. [3072, 768, 469e9]"]
    start, increment, tokens = ramp
    if not (0 < start < global_batch and increment > 0 and tokens > 0 and (global_batch - start) % increment == 0):
        return [f"train.batch_ramp={ramp!r}: 0 < start < train.global_batch={global_batch}, increment > 0 dividing "
                "global_batch - start, and tokens > 0"]
    return []
