"""The reward call: what every reward function receives, built in one place so that `align grpo`, `align ppo`,
`align eval`, `align pairs` and `align rewards check` pass exactly the same thing.

    fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_metric=..., log_extra=...,
       **columns)

- prompts: each data row's prompt, repeated for each of its k completions (groups are consecutive). align's prompt
  loader (align.data.prompts) makes every prompt a conversation, so this is a list of messages;
- completions: in the prompt's form (TRL's rule) — `[{"role": "assistant", "content": text}]` for a conversation,
  the text for a plain-string prompt;
- completion_ids: each completion's token ids (EOS included when one was generated);
- trainer_state: the transformers `TrainerState` during training (global_step, max_steps, ...) for rewards that
  change with progress; None outside training;
- log_metric(name, value) / log_extra(column, values): TRL's logging hooks. grpo gets TRL's own; ppo logs the
  metrics with its step; elsewhere they are accepted and ignored;
- every other column of the row (e.g. `answer`), repeated like the prompt.

In grpo TRL's GRPOTrainer builds this call itself (its `_calculate_rewards`); `build_call` makes the same one for
the other paths, and tests/test_rewards.py checks that all four deliver identical arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RESERVED = ("prompt", "completion", "completion_ids")  # columns the call provides itself (TRL drops them too)
# keywords besides columns; with tools (align.stages.tool_rollout) also each completion's `conversation` (the messages
# after the prompt) and `environments` (its environment instance, TRL's name)
PROVIDED = ("completion_ids", "trainer_state", "log_metric", "log_extra", "environments", "conversation")


def data_columns(kwargs: dict[str, Any]) -> list[str]:
    """The data's columns among a reward call's keyword arguments."""
    return sorted(k for k in kwargs if k not in PROVIDED)


def missing_columns(rewards: list, row: dict[str, Any]) -> list[str]:
    """Problems for rewards that declare the data columns they read (`fn.columns`) which `row` lacks."""
    return [f"reward '{r.name}' reads the '{c}' column, which the data lacks (columns: "
            f"{', '.join(k for k in row if k != 'prompt') or 'none besides the prompt'}); add it, rename one with "
            f"--columns {c}=COLUMN, or set {r.name}(column=...)"
            for r in rewards for c in getattr(r.fn, "columns", ()) if c not in row]


def _ignore(*args: Any, **kwargs: Any) -> None:
    """A logging hook outside training: accepted, nothing to log to."""


def per_sample(kwargs: dict[str, Any], n: int, start: int, stop: int) -> dict[str, Any]:
    """Keyword arguments for samples start..stop of n: lists of one value per sample are cut, the rest kept."""
    return {k: v[start:stop] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}


def as_completion(prompt: Any, text: str) -> Any:
    """A completion in its prompt's form: a one-message conversation for a conversational prompt, else the text."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


@dataclass
class RewardCall:
    prompts: list[Any]
    completions: list[Any]
    kwargs: dict[str, Any] = field(default_factory=dict)  # completion_ids, trainer_state, hooks and the columns

    def __len__(self) -> int:
        return len(self.prompts)

    def part(self, start: int, stop: int) -> RewardCall:
        """The call for completions start..stop (per-sample keyword arguments cut alike, the rest shared)."""
        return RewardCall(self.prompts[start:stop], self.completions[start:stop],
                          per_sample(self.kwargs, len(self), start, stop))

    def score(self, rewards: list) -> list[list[float | None]]:
        """Each (guarded) reward's scores for every completion."""
        return [fn(self.prompts, self.completions, **self.kwargs) for fn in rewards]


def build_call(rows: list[dict[str, Any]], texts: list[str], completion_ids: list[list[int]] | None, k: int = 1, *,
               trainer_state: Any = None, log_metric: Callable | None = None,
               log_extra: Callable | None = None, per_completion: dict[str, list] | None = None) -> RewardCall:
    """The call for `rows` ({"prompt": ..., **columns}) whose completions are `texts` (k per row, grouped);
    `per_completion`: more keywords with one value per completion (with tools: conversation, environments)."""
    if len(texts) != len(rows) * k:
        raise ValueError(f"{len(texts)} completions for {len(rows)} rows x {k}")
    prompts = [r["prompt"] for r in rows for _ in range(k)]
    columns = {c: [r.get(c) for r in rows for _ in range(k)] for c in rows[0] if c not in RESERVED} if rows else {}
    return RewardCall(
        prompts, [as_completion(p, t) for p, t in zip(prompts, texts, strict=True)],
        {**columns, "completion_ids": completion_ids, "trainer_state": trainer_state,
         "log_metric": log_metric or _ignore, "log_extra": log_extra or _ignore, **(per_completion or {})},
    )
