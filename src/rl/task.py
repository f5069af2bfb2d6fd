"""The verifiable task that ships with moetron for GRPO: sums of two numbers, asked as the shipped chat
sample asks them ("What is 23 + 58?", answered "23 + 58 = 81."), with exact answers to reward.

    python -m moetron.rl.task --output data/sums.jsonl --count 2000      # {"prompt", "answer"} per line
    python -m moetron.rl.task --output data/sums_chat.jsonl --chat       # answered conversations, for SFT
    moetron-train stage=grpo rl.prompts=data/sums.jsonl rl.reward=moetron.rl.task:exact_answer ...
"""
from __future__ import annotations

import argparse
import json
import random
import re
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


def answered(examples: list[dict]) -> list[dict]:
    """Each question as a conversation answered in the task's format ("23 + 58 = 81."): SFT data that
    teaches the format GRPO then rewards."""
    return [{"messages": [{"role": "user", "content": ex["prompt"]},
                          {"role": "assistant", "content": f"{ex['prompt'][8:-1]} = {ex['answer']}."}]}
            for ex in examples]


_FORMAT = re.compile(r"\d+ \+ \d+ = -?\d+\.")


def answer_format(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 where a completion is written as the task's answers are ("23 + 58 = 81."), the operands
    those of its question; else 0.0 (a format reward, as DeepSeek-R1's)."""
    return [1.0 if _FORMAT.fullmatch(c.strip()) and c.strip().startswith(p[8:-1] + " =") else 0.0
            for p, c in zip(prompts, completions)]


def exact_answer(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the last integer a completion writes is the answer, else 0.0."""
    return [1.0 if last_integer(c) == int(a) else 0.0 for c, a in zip(completions, answer)]


def near_answer(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """1 - |written - answer| / 10, at least 0 (the last integer a completion writes): a shaped reward
    that credits answers closer to the sum, for models too small to get many exactly right."""
    out = []
    for c, a in zip(completions, answer):
        written = last_integer(c)
        out.append(0.0 if written is None else max(0.0, 1.0 - abs(written - int(a)) / 10))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetron.rl.task", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="answered conversations (SFT data) instead of questions")
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    rows = sums(args.count, args.seed)
    rows = answered(rows) if args.chat else rows
    args.output.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {args.output}: {args.count} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
