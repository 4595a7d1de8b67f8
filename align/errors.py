"""User-facing errors.

`AlignError` is the one exception type for mistakes a user can fix (bad data, config, path or parent run).
The CLI prints its message on stderr without a traceback and exits with code 2; anything else is an internal
error (exit 1, with traceback).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AlignError(Exception):
    """A user error: the message names the file/line/field, shows the bad value and says the fix."""

    def __init__(self, message: str, problems: Iterable[str] = ()):
        self.problems = list(problems)
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for a near miss, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> str:
    """Message for an unknown name that lists the valid ones ("Unknown adapter 'lroa'. Available: ...")."""
    choices = sorted(choices)
    return f"Unknown {kind} '{name}'.{did_you_mean(name, choices)} Available: {', '.join(choices)}."


class Problems:
    """Collects every problem found during validation so they can be reported at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def extend(self, messages: Iterable[str]) -> None:
        self.items.extend(messages)

    def add_error(self, error: Exception) -> None:
        """An error raised by a check: its own list of problems if it has one (each already names what it is about;
        its headline would be a bullet above them), else its message."""
        self.extend(getattr(error, "problems", None) or [str(error)])

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, headline: str) -> None:
        if self.items:
            raise AlignError(headline, self.items)
