"""The learning rate of a step, from the step and the tokens trained so far.

Default (`optim.schedule` unset): linear warmup over `optim.warmup_steps` to `optim.lr`, then cosine
decay to `optim.lr x optim.min_lr_ratio` at `optim.decay_steps`, and that floor after. The horizon
is a setting of its own, not `train.max_steps`: raising `train.max_steps` to train on extends the
run at the floor instead of moving the learning rate back up.

`optim.schedule`: phases in tokens, as DeepSeek-V3 trains (report section 4.2):

    [{warmup_steps: 2000, lr: 2.2e-4},                      # linear from 0, in steps
     {until_tokens: 10.0e12, lr: 2.2e-4},                   # constant
     {until_tokens: 14.3e12, lr: 2.2e-5, shape: cosine},    # cosine from the previous rate
     {until_tokens: 14.633e12, lr: 2.2e-5},
     {until_tokens: 14.8e12, lr: 7.3e-6}]

A warmup, if any, comes first; every other phase ends at `until_tokens` (increasing) with rate
`lr`, constant or (`shape: cosine`) decaying from the previous phase's rate since the previous
phase's end. After the last phase the last rate holds.
"""
from __future__ import annotations

import math
from typing import Any, Optional

SHAPES = ("constant", "cosine")


def lr_at(step: int, tokens: float, cfg) -> float:
    """The rate of step `step` (0-based), `tokens` having been trained before it."""
    if cfg.schedule:
        return scheduled_lr(cfg.schedule, step, tokens)
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.decay_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduled_lr(phases: list, step: int, tokens: float) -> float:
    rate, start = 0.0, 0.0  # the previous phase's rate, and where (in tokens) it ended
    for phase in phases:
        if "warmup_steps" in phase:
            if step < phase["warmup_steps"]:
                return phase["lr"] * (step + 1) / phase["warmup_steps"]
            rate = phase["lr"]
            continue
        end = float(phase["until_tokens"])
        if tokens < end:
            if phase.get("shape", "constant") == "constant":
                return phase["lr"]
            progress = (tokens - start) / (end - start)
            return phase["lr"] + (rate - phase["lr"]) * 0.5 * (1.0 + math.cos(math.pi * progress))
        rate, start = phase["lr"], end
    return rate


def schedule_problems(phases: Optional[list[Any]]) -> list[str]:
    """What is wrong with an `optim.schedule`, each naming the phase and the fix."""
    if phases is None:
        return []
    if not isinstance(phases, list) or not phases:
        return ["optim.schedule must be a list of phases: [{warmup_steps: N, lr: X}, {until_tokens: T, lr: X}, ...]"]
    problems, last_end = [], 0.0
    for i, phase in enumerate(phases):
        where = f"optim.schedule[{i}]"
        if not isinstance(phase, dict) or "lr" not in phase or not isinstance(phase["lr"], (int, float)) \
                or phase["lr"] < 0:
            problems.append(f"{where}={phase!r} needs a rate lr >= 0")
            continue
        if "warmup_steps" in phase:
            if i != 0 or set(phase) != {"warmup_steps", "lr"} or not isinstance(phase["warmup_steps"], int) \
                    or phase["warmup_steps"] < 1:
                problems.append(f"{where}: a warmup is the first phase, {{warmup_steps: N >= 1, lr: X}}")
            continue
        end = phase.get("until_tokens")
        if set(phase) - {"until_tokens", "lr", "shape"} or not isinstance(end, (int, float)) or end <= last_end:
            problems.append(f"{where}={phase!r}: a phase is {{until_tokens: T, lr: X, shape: constant|cosine}} with "
                            f"T above the previous phase's ({last_end:g})")
            continue
        if phase.get("shape", "constant") not in SHAPES:
            problems.append(f"{where}: shape={phase['shape']!r}: choose one of {SHAPES}")
        last_end = float(end)
    return problems
