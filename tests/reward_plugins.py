"""Reward functions used by tests/test_rewards.py through `module:function` and file specs."""

import asyncio
import math
import time


def has_digit(prompts, completions, **columns):
    return [float(any(ch.isdigit() for ch in c)) for c in completions]


def never_applies(prompts, completions, **columns):
    return [None for _ in completions]


def needs_answer(prompts, completions, answer, **columns):
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


async def async_len(prompts, completions, **columns):
    await asyncio.sleep(0)
    return [float(len(c)) for c in completions]


def only_short(prompts, completions, **columns):
    return [None if len(c) > 3 else 1.0 for c in completions]


def breaks_on_boom(prompts, completions, **columns):
    return [1.0 / (0 if c == "boom" else 1) for c in completions]


def nan_on_third(prompts, completions, **columns):
    return [math.nan if i == 2 else 0.0 for i in range(len(completions))]


def too_few(prompts, completions, **columns):
    return [0.0]


def slow(prompts, completions, **columns):
    time.sleep(2)
    return [0.0] * len(completions)


def text_score(prompts, completions, **columns):
    return ["high" for _ in completions]


def scaled(factor=1.0):
    def reward(prompts, completions, **columns):
        return [factor * len(c) for c in completions]

    return reward


async def text_len(prompts, completions, **columns):
    from align.rewards.builtin import completion_text

    return [float(len(completion_text(c))) for c in completions]


def record(prompts, completions, **kwargs):
    """Appends what it received (types and shapes, not values) to the JSON-lines file $ALIGN_RECORD_REWARD_CALL."""
    import json
    import os

    def kind(value):
        if isinstance(value, list):
            return ["list", kind(value[0]) if value else None]
        if isinstance(value, dict):
            return {k: kind(v) for k, v in sorted(value.items())}
        return type(value).__name__

    with open(os.environ["ALIGN_RECORD_REWARD_CALL"], "a") as f:
        f.write(json.dumps({"prompts": kind(prompts), "completions": kind(completions),
                            "kwargs": {k: "callable" if callable(v) and not isinstance(v, list) else kind(v)
                                       for k, v in sorted(kwargs.items())},
                            "sizes": sorted({len(prompts), len(completions), len(kwargs["completion_ids"] or prompts)}),
                            "completion_ids_match": kwargs["completion_ids"] is None or all(
                                isinstance(t, int) for ids in kwargs["completion_ids"] for t in ids)}) + "\n")
    return [0.0] * len(completions)


def make_constant(value=0.5):
    """A factory: `reward_plugins:make_constant()` makes the reward."""

    def constant(prompts, completions, **kwargs):
        return [value] * len(completions)

    return constant


def hangs(prompts, completions, **columns):
    time.sleep(600)
    return [0.0] * len(completions)


def short_is_better(prompts, completions, **columns):
    """Minus text_len: a gold metric that contradicts a length proxy (tests/test_overopt.py)."""
    from align.rewards.builtin import completion_text

    return [-float(len(completion_text(c))) for c in completions]
