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
