"""The verifiable task that ships with moetron for GRPO: sums of two numbers, asked as the shipped chat
sample asks them ("What is 23 + 58?", answered "23 + 58 = 81."), with exact answers to reward.

    python -m moetron.rl.task --output data/sums.jsonl --count 2000      # {"prompt", "answer"} per line
    moetron-train stage=grpo rl.prompts=data/sums.jsonl rl.reward=moetron.rl.task:exact_answer ...
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from moetron.rl.rewards import last_integer


def sums(count: int, seed: int = 0, high: int = 99) -> list[dict]:
    """`count` questions "What is a + b?" with 1 <= a, b <= high, and their answers."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(1, high), rng.randint(1, high)
        out.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    return out


def exact_answer(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the last integer a completion writes is the answer, else 0.0."""
    return [1.0 if last_integer(c) == int(a) else 0.0 for c, a in zip(completions, answer)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetron.rl.task", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(row) + "\n" for row in sums(args.count, args.seed)))
    print(f"wrote {args.output}: {args.count} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
