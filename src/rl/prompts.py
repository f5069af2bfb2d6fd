"""The prompts GRPO samples from (`rl.prompts`): a .jsonl file of {"prompt": ..., other fields the
reward reads} per line, or "sums", the task that ships with moetron (moetron.rl.task).

Step s takes the prompts [s x P, (s + 1) x P) of an endless sequence of epochs, each a permutation
of the file drawn from (seed, epoch): a function of the step alone, so a resumed run takes the same
prompts, in any layout (data rank r of n takes its P / n of them, in order).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from moetron.rl.task import sums

SUMS = "sums"
SUMS_COUNT = 2000  # questions of the shipped task (its answers are checked exactly)


def load_prompts(source: str, seed: int = 0) -> list[dict]:
    """The examples of `rl.prompts`; ValueError naming the key and the line when one cannot be used."""
    if source == SUMS:
        return sums(SUMS_COUNT, seed=seed)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"rl.prompts={source!r}: no such file; give a .jsonl file of {{\"prompt\": ...}} lines, "
                         f"or rl.prompts={SUMS} (`python -m moetron.rl.task --output FILE` writes that task)")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"rl.prompts={source}: line {number} is not JSON ({err})") from err
        if not isinstance(example, dict) or not isinstance(example.get("prompt"), str):
            raise ValueError(f"rl.prompts={source}: line {number} has no \"prompt\" string")
        examples.append(example)
    if not examples:
        raise ValueError(f"rl.prompts={source}: the file holds no prompts")
    keys = set(examples[0])
    for number, example in enumerate(examples, start=1):
        if set(example) != keys:
            raise ValueError(f"rl.prompts={source}: example {number} has the fields {sorted(example)}, the first "
                             f"{sorted(keys)}; every example needs the same fields (the reward gets them as lists)")
    return examples


def step_prompts(examples: list[dict], step: int, count: int, seed: int) -> list[dict]:
    """The `count` examples of step `step` (0-based)."""
    n, orders, out = len(examples), {}, []
    for i in range(step * count, (step + 1) * count):
        epoch, index = divmod(i, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(examples[int(orders[epoch][index])])
    return out
