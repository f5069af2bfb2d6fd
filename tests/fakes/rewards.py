"""Reward functions for the GRPO tests (`rl.reward=tests.fakes.rewards:NAME`)."""


def checksum(prompts, completions, **_):
    """A reward that differs between the completions of a group even from an untrained model."""
    return [float(sum(map(ord, c)) % 5) for c in completions]


def raises(prompts, completions, **_):
    raise KeyError("no such answer")


def too_few(prompts, completions, **_):
    return [0.0] * (len(completions) - 1)


def nan(prompts, completions, **_):
    return [float("nan")] * len(completions)
