"""Writes conversations.jsonl: the chat sample moetron ships, written for the project (no outside data).

    python -m moetron.data.chat_sample.build_conversations     # rewrites it, the same bytes every time

Small tasks a tiny model can learn a little of in a few minutes on a CPU (sums, reversed words,
letter counts, capitals, short facts about Python), as single questions, multi-turn exchanges, with
and without a system prompt, and some as prompt / completion pairs.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("conversations.jsonl")
COUNT = 400
WORDS = ("python", "tensor", "expert", "router", "gradient", "pipeline", "token", "matrix", "kernel", "vector",
         "sequence", "optimizer", "cluster", "memory", "latent", "attention", "shard", "bucket", "scale", "batch")
SYSTEMS = ("You are a helpful assistant.", "Answer in one short sentence.", "You are a terse assistant.")
FACTS = (
    ("What does len() return?", "The number of items in a container."),
    ("What does a list comprehension build?", "A new list from an iterable, one element per item."),
    ("What is a Python dictionary?", "A mapping from hashable keys to values."),
    ("What does range(3) produce?", "The integers 0, 1 and 2."),
    ("What keyword defines a function in Python?", "The keyword def."),
    ("What does sorted() return?", "A new sorted list of the items it is given."),
    ("What is a tuple?", "An immutable sequence of values."),
    ("What does the with statement manage?", "A context: setup on entry and cleanup on exit."),
    ("What does str.split() do?", "It splits a string into a list of words."),
    ("What is None in Python?", "The single value that stands for no value."),
    ("What does zip() do?", "It pairs up the items of several iterables."),
    ("What does import do?", "It loads a module and binds its name."),
)


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(kind, question, answer) of one random task."""
    kind = rng.choice(("sum", "reverse", "count", "upper", "fact"))
    word = rng.choice(WORDS)
    if kind == "sum":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return kind, f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    if kind == "reverse":
        return kind, f"Reverse the word '{word}'.", f"'{word}' reversed is '{word[::-1]}'."
    if kind == "count":
        return kind, f"How many letters are in '{word}'?", f"'{word}' has {len(word)} letters."
    if kind == "upper":
        return kind, f"Write '{word}' in capitals.", word.upper()
    return (kind, *rng.choice(FACTS))


def conversation(rng: random.Random) -> dict:
    """One record: a single question, or a follow-up exchange; a system prompt in a third of them."""
    kind, question, answer = _task(rng)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if kind == "sum" and rng.random() < 0.5:
        total = int(answer.split("= ")[1].rstrip("."))
        messages += [{"role": "user", "content": "And twice that?"},
                     {"role": "assistant", "content": f"2 x {total} = {2 * total}."}]
    elif rng.random() < 0.3:
        _, question2, answer2 = _task(rng)
        messages += [{"role": "user", "content": question2}, {"role": "assistant", "content": answer2}]
    if rng.random() < 0.33:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
    if len(messages) == 2 and rng.random() < 0.2:
        return {"prompt": question, "completion": answer}
    return {"messages": messages}


def main() -> None:
    rng = random.Random(0)
    lines = [json.dumps(conversation(rng), ensure_ascii=False) for _ in range(COUNT)]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {COUNT} conversations")


if __name__ == "__main__":
    main()
