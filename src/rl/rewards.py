"""Rewards for GRPO: a user's function named `module:function` (`rl.reward`), called with the batch's
prompts, completions and each example's other fields, returning one float per completion; and the
rule-based rewards of the task that ships with the project (moetron.rl.task).

    def my_reward(prompts: list[str], completions: list[str], **fields) -> list[float]: ...
    moetron-train stage=grpo rl.reward=my_module:my_reward ...

A function that raises, returns another number of values, or a value that is not a finite float
stops the run with a message naming it (`RewardError`).
"""
from __future__ import annotations

import importlib
import math
import re
from typing import Callable


class RewardError(ValueError):
    """A reward function that failed or returned what GRPO cannot use (the message names it)."""


def load_reward(name: str) -> Callable:
    """The function `module:function` names (a module on the path, e.g. moetron.rl.task:exact_answer)."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise RewardError(f"rl.reward={name!r}: give it as module:function, e.g. moetron.rl.task:exact_answer")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"rl.reward={name!r}: cannot import {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"rl.reward={name!r}: {module_name} has no function {attr!r}")
    return fn


def score(fn: Callable, name: str, prompts: list[str], completions: list[str], fields: dict[str, list]) -> list[float]:
    """`fn`'s rewards of the completions, checked: as many as completions, each a finite number."""
    try:
        rewards = fn(prompts, completions, **fields)
    except Exception as err:  # noqa: BLE001 - whatever the user's code raises stops the run, named
        raise RewardError(f"rl.reward={name}: raised {type(err).__name__}: {err}") from err
    try:
        rewards = [float(r) for r in rewards]
    except (TypeError, ValueError) as err:
        raise RewardError(f"rl.reward={name}: returned {type(rewards).__name__} that is not a list of numbers "
                          f"({err})") from err
    if len(rewards) != len(completions):
        raise RewardError(f"rl.reward={name}: returned {len(rewards)} rewards for {len(completions)} completions")
    bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
    if bad:
        raise RewardError(f"rl.reward={name}: reward {rewards[bad[0]]} for completion {bad[0]} "
                          f"({completions[bad[0]][:60]!r}); every reward must be a finite number")
    return rewards


_LAST_INTEGER = re.compile(r"-?\d+")


def last_integer(text: str):
    """The last integer written in `text`, or None."""
    found = _LAST_INTEGER.findall(text)
    return int(found[-1]) if found else None
