"""`--keep-best METRIC[:max|min]`: keep the policy of the evaluation step with the best held-out metric.

Every time the run logs METRIC (a held-out key: `eval/...` as ppo writes it or `eval_...` as the TRL stages do — the
two spellings name the same metric) and it beats the best so far (strictly: on a tie the earlier step stays), the
policy at that step is written to RUN/best/ (its adapter, or model/ for full fine-tuning, and best.json), atomically,
outside RUN/checkpoints/ so that `--save-total-limit` never deletes it. The evaluation before the first step (step 0:
the starting policy) is a candidate too: if training only made the metric worse, the starting policy is kept. At the
end RUN/adapter (or model/) is that policy and run.json records `best: {metric, mode, step, value}`; RUN/best/ is
then removed. A pipeline hands that policy to the next stage (it is the run's adapter) and names the step in
pipeline.json.

Direction: `max` unless the metric ends in `:min` (`eval_loss:min`); a metric named like a loss must say which.
A metric the run never logged is an error at the end (before the adapter is written), naming the held-out metrics
it did log; ppo and grpo check reward and gold names at validation.
Resume: a best saved at or before the checkpoint the run resumes from is kept; a later one (of steps that will be
replayed) is dropped and found again by the replay.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from align.errors import AlignError, Problems

logger = logging.getLogger(__name__)
HELD_OUT = ("eval/", "eval_")


def parse(spec: str) -> tuple[str, str]:
    """'METRIC[:max|min]' -> (metric, mode); AlignError for a bad spec."""
    metric, colon, mode = spec.rpartition(":") if spec.endswith((":max", ":min")) else (spec, "", "max")
    if not metric or held_out_name(metric) is None:
        raise AlignError(f"--keep-best {spec!r}: name a held-out metric, logged at evaluation steps (e.g. "
                         "eval/gold/accuracy/mean, eval/score, eval_loss:min), optionally followed by :max (default) "
                         "or :min.")
    if not colon and "loss" in metric.rsplit("/", 1)[-1]:
        raise AlignError(f"--keep-best {spec!r}: say whether lower or higher is better: {metric}:min (or {metric}:max).")
    return metric, mode


def held_out_name(key: str) -> str | None:
    """The metric a logged key names without its held-out prefix ('eval/score' and 'eval_score' -> 'score'), or None
    for a training key."""
    for prefix in HELD_OUT:
        if key.startswith(prefix) and len(key) > len(prefix):
            return key[len(prefix):]
    return None


def value_of(record: dict[str, Any], metric: str) -> float | None:
    """METRIC's finite value in one metrics record (either held-out spelling), else None."""
    name = held_out_name(metric)
    for prefix in HELD_OUT:
        value = record.get(prefix + name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def pick(records: Iterable[dict[str, Any]], metric: str, mode: str = "max") -> tuple[int, float] | None:
    """(step, value) of the best record for METRIC — the first one on a tie — or None if it was never logged."""
    best: tuple[int, float] | None = None
    for record in records:
        value = value_of(record, metric)
        if value is not None and better(value, best and best[1], mode):
            best = (int(record.get("step", 0)), value)
    return best


def check(spec: str | None, cfg, problems: Problems, known: list[str] | None = None) -> None:
    """Validation: a parsable spec, held-out data to compute it on, and (when the stage knows the names it logs, as
    ppo/grpo do for rewards and gold) a metric it produces."""
    if not spec:
        return
    try:
        metric, _ = parse(spec)
    except AlignError as e:
        problems.add_error(e)
        return
    if not getattr(cfg, "eval_data", None) and not getattr(cfg, "eval_split", 0):
        problems.add(f"--keep-best {spec}: compares held-out metrics, and this run has no held-out data. Add "
                     "--eval-data FILE (or --eval-split 0.1).")
    name = held_out_name(metric)
    family = next((f for f in ("gold/", "rewards/") if name.startswith(f)), None)
    if known is not None and family and name not in known:
        options = [f"eval/{k}" for k in known if k.startswith(family)]
        problems.add(f"--keep-best {spec}: this run logs no {metric}. It logs " + (", ".join(options) or "none")
                     + (" (add the function with --gold-reward)." if family == "gold/" else "."))


class Keeper:
    """Tracks the best value of METRIC over a run and writes the best policy to RUN/best/."""

    def __init__(self, run, spec: str, artifact: str = "adapter", resume_step: int | None = None):
        self.run, self.spec, self.artifact = run, spec, artifact
        self.metric, self.mode = parse(spec)
        self.step: int | None = None
        self.value: float | None = None
        self.seen: set[str] = set()  # held-out keys logged, for the error if METRIC never was
        saved = self.dir / "best.json"
        info = json.loads(saved.read_text()) if resume_step is not None and saved.is_file() else {}
        if info.get("metric") == self.metric and info.get("step", math.inf) <= resume_step:
            self.step, self.value = info["step"], info["value"]
        elif run.writer and self.dir.exists():
            shutil.rmtree(self.dir)  # not ours to keep (a fresh start, or a best beyond the resumed step)

    @property
    def dir(self) -> Path:
        return self.run.path / "best"

    def offer(self, record: dict[str, Any], step: int, save: Callable[[Path], None]) -> bool:
        """A logged record at `step`; if it holds a new best value, `save(directory)` writes the policy. True then."""
        self.seen.update(k for k in record if held_out_name(k) is not None)
        value = value_of(record, self.metric)
        if value is None or not better(value, self.value, self.mode):
            return False
        self.step, self.value = step, value
        if self.run.writer:
            with self.run.artifact("best") as tmp:
                save(tmp / self.artifact)
                (tmp / "best.json").write_text(json.dumps(self.describe()) + "\n")
        logger.info("keep-best: %s = %.4g at step %d (best so far).", self.metric, value, step)
        return True

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "step": self.step, "value": self.value}

    def finish(self) -> dict[str, Any]:
        """The best {metric, mode, step, value}; AlignError if METRIC was never logged."""
        if self.step is None:
            logged = sorted(self.seen)
            raise AlignError(f"--keep-best {self.spec}: the run never logged {self.metric} at an evaluation step "
                             f"(held-out metrics logged: {', '.join(logged) or 'none'}). Choose one of those.")
        return self.describe()

    def install(self, directory: Path) -> None:
        """Copy the kept policy into `directory` (the run's adapter/ or model/ being written)."""
        shutil.copytree(self.dir / self.artifact, directory, dirs_exist_ok=True)

    def discard(self) -> None:
        if self.run.writer:
            shutil.rmtree(self.dir, ignore_errors=True)


def callback(keeper: Keeper, tokenizer):
    """A transformers TrainerCallback feeding every logged record to `keeper` (the TRL stages)."""
    from transformers import TrainerCallback

    from align.models import save_policy

    class KeepBest(TrainerCallback):
        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if logs:
                keeper.offer(logs, state.global_step, lambda d: save_policy(model, tokenizer, d))

    return KeepBest()
