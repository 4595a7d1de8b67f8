"""Reward sources for online RL (grpo, ppo) and `align rewards check`.

Protocol (TRL-compatible): `fn(prompts, completions, **columns) -> list[float | None]`, where columns are
the dataset's other columns (e.g. `answer`) and None means "not applicable". Async functions are allowed.
Specs (align.rewards.registry): a built-in name, an `align.rewards` entry point, `file.py:fn`,
`package.module:fn`, or a reward-model run, each with optional `(settings)` and `@weight`. Calls are guarded
(align.rewards.guard): exceptions, wrong lengths, NaN and timeouts raise a RewardError naming the function and
the sample.
"""

from align.rewards.guard import GuardedReward, RewardError, guard_all, weighted_total
from align.rewards.registry import Reward, available, resolve_rewards

__all__ = ["GuardedReward", "Reward", "RewardError", "available", "guard_all", "resolve_rewards", "weighted_total"]
