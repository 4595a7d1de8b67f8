"""Tools and environments used by tests/test_tools.py through `file.py:name` specs."""

import threading

NEVER = threading.Event()


def boom(x: int) -> str:
    """Always fails.

    Args:
        x: Any number.
    """
    raise RuntimeError(f"boom {x}")


def hang(x: int) -> str:
    """Never returns (until the process ends).

    Args:
        x: Any number.
    """
    NEVER.wait()
    return "unreachable"


def garbage(x: int) -> str:
    """Returns something that is neither text nor JSON.

    Args:
        x: Any number.
    """
    return object()


def double(x: int) -> dict:
    """Twice x, as a JSON object.

    Args:
        x: The number to double.
    """
    return {"value": 2 * x}


def undocumented(x):
    return x


class Counter:
    """Counts its own calls: state that must stay within one rollout."""

    def __init__(self):
        self.count = 0

    def increment(self, by: int) -> str:
        """Add to the counter and return its new value.

        Args:
            by: How much to add.
        """
        self.count += by
        return str(self.count)

    def reset(self, **row):
        self.count = 0


class CountingCalculator:
    """The built-in calculator as an environment (the same schema) that counts its calls within its rollout."""

    def __init__(self):
        self.calls = 0

    def calculator(self, expression: str) -> str:
        """Evaluate an arithmetic expression exactly.

        Args:
            expression: The expression, e.g. "12345 * 678": numbers, + - * / // % **, unary minus and parentheses.
        """
        from align.rewards.tools import calculator

        self.calls += 1
        return calculator(expression)


def env_calls(prompts, completions, conversation, environments, **columns):
    """A reward reading what multi-turn rollouts hand the rewards: each rollout's own environment state, checked
    against the tool results in its conversation."""
    if len({id(e) for e in environments}) != len(environments):
        raise ValueError("rollouts share an environment instance")
    for env, messages in zip(environments, conversation, strict=True):  # malformed calls never reach the environment
        if env.calls > sum(m["role"] == "tool" for m in messages):
            raise ValueError(f"{env.calls} calls but {messages}")
    return [float(env.calls) for env in environments]
