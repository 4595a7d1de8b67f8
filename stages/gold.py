"""Gold metrics of the online-RL stages (ppo, grpo): what the policy is *meant* to get better at, measured beside the
proxy it is trained on, and never trained on.

An RL stage optimising a reward model (the proxy) can over-optimise it: the RM score keeps rising while the quality
it stands for peaks and falls (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization").
`--gold-reward SPEC` (same spec syntax as `--reward`; several allowed) names that quality, e.g. the `accuracy`
verifier. Every gold function is scored

- on each step's rollouts: logged as `gold/<name>/mean` beside the proxy (`rewards/<name>/mean` and the total:
  ppo `objective/scores`, grpo `reward`);
- on the held-out prompts at evaluation steps: `eval/gold/<name>/mean` (ppo) / `eval_gold/<name>/mean` (grpo,
  TRL's spelling of held-out keys).

Gold scores are computed after the proxy rewards, from the same prompts, completions and data columns (the same
call as every reward, align.rewards.call), and only ever go to the metrics: they are not in the score, the
advantages or the loss, and they consume no random numbers, so a run with and without gold trains identically.
A gold function's own log_metric / log_extra calls are dropped (they would mix with the proxy's).
`align report` draws gold against proxy over steps and against the KL to the parent (align.report).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align.config import opt
from align.errors import AlignError, Problems

PREFIX = "gold/"


@dataclass
class GoldOptions:
    gold_reward: list[str] = opt(factory=list, help="Gold metric(s) (repeatable; same specs as --reward, e.g. "
                                                    "accuracy): scored on every step's rollouts (gold/<name>/mean) and "
                                                    "on the held-out prompts at eval steps, beside the proxy reward, "
                                                    "but never trained on. In a pipeline: the eval block's rewards "
                                                    "and accuracy when the stage uses a reward model.")

    def check(self, problems: Problems) -> None:
        if not self.gold_reward:
            return
        from align.rewards import resolve_rewards

        try:
            golds = resolve_rewards(self.gold_reward)
        except AlignError as e:
            for problem in e.problems or [str(e)]:
                problems.add(f"--gold-reward: {problem}")
            return
        names = [g.name for g in golds]
        if len(set(names)) < len(names):
            problems.add(f"--gold-reward: two gold metrics share a name ({', '.join(names)}); each is logged as "
                         "gold/<name>/mean, so give each a distinct function.")
        proxies = set(getattr(self, "reward_specs", list)())
        same = [s for s in self.gold_reward if s in proxies]
        if same:
            problems.add(f"--gold-reward {' '.join(same)} is also a training reward (--reward / --reward-model): a gold "
                         "metric is the one the policy is not trained on. Drop it from one of the two.")

    def held_out_names(self) -> list[str] | None:
        """Reward and gold metric names this stage logs (for --keep-best's validation); None if a spec is bad."""
        from align.rewards import resolve_rewards

        try:
            rewards, golds = resolve_rewards(getattr(self, "reward_specs", list)()), resolve_rewards(self.gold_reward)
        except AlignError:
            return None
        return [f"rewards/{r.name}/{s}" for r in rewards for s in ("mean", "std")] + \
            [f"{PREFIX}{g.name}/mean" for g in golds]


class Gold:
    """The gold reward functions of a run, guarded like training rewards; `scores` scores a call."""

    def __init__(self, specs: list[str], timeout: float | None, on_fault: str, trust_remote_code: bool = False):
        from align.rewards import guard_all
        from align.rewards.reward_model import allow_remote_code

        self.rewards = allow_remote_code(guard_all(specs, timeout=timeout, on_fault=on_fault), trust_remote_code)

    @classmethod
    def from_config(cls, cfg) -> Gold | None:
        if not getattr(cfg, "gold_reward", None):
            return None
        return cls(cfg.gold_reward, cfg.reward_timeout, cfg.reward_faults, getattr(cfg, "trust_remote_code", False))

    def scores(self, call) -> dict[str, list[float | None]]:
        """{gold/<name>/mean: each completion's score (None = not applicable)} for a RewardCall."""
        from align.rewards.call import _ignore

        quiet = type(call)(call.prompts, call.completions, {**call.kwargs, "log_metric": _ignore, "log_extra": _ignore})
        return {f"{PREFIX}{fn.__name__}/mean": values for fn, values in zip(self.rewards, quiet.score(self.rewards),
                                                                             strict=True)}


def column_problems(cfg, row: dict[str, Any]) -> list[str]:
    """Gold functions that read a data column (accuracy: `answer`) the prompt data lacks."""
    from align.rewards import resolve_rewards
    from align.rewards.call import missing_columns

    try:
        golds = resolve_rewards(getattr(cfg, "gold_reward", []) or [])
    except AlignError:  # reported by GoldOptions.check
        return []
    return [f"--gold-reward: {p} (in a pipeline, gold_reward defaults to the eval block's rewards and accuracy for a "
            "stage on a reward model; set gold_reward: [] to turn them off)" for p in missing_columns(golds, row)]
