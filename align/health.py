"""Training health: is what a stage trained usable, or did training degenerate while it "completed"?

Every training stage records `health` in run.json:

    weights           max |w| of the trained weights at the start and the end, and how many tensors hold NaN/inf
    zero_grad_steps   the last logged steps whose grad norm is exactly 0 (the loss flat: nothing is learned)
    non_finite_loss   logged steps whose loss is NaN/inf
    rewards           per reward function (grpo, ppo): logged steps, steps where it was None for every sample, its
                      range over the run
    zero_std_groups   grpo: the mean share of groups whose completions all got the same reward (advantage 0)
    identical_pairs   dpo, rm: the share of training pairs whose chosen equals rejected
    warnings          what of the above makes the run suspect, one sentence each

Failures, always (the run is `failed`, exit 2, and nothing of it is handed on): NaN/inf in the trained weights, or
weights that exploded (max |w| above EXPLODED and above GROWTH × its value at the start: a learning rate far too high;
such weights are finite but the model only emits one distribution, as `--lr 1e6` does). Warnings (in the log, run.json
and `align report`): a reward that was None for every sample of the run or constant over it, every GRPO group with
zero reward variance, pairs with chosen == rejected, the loss flat with grad norm 0 over the last logged steps, a
NaN/inf loss. `--strict` (default in pipelines) turns the warnings into a failure.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from align.errors import AlignError

logger = logging.getLogger(__name__)

EXPLODED = 1e4  # max |w| above this (and GROWTH × the start) means training diverged
GROWTH = 100.0
ZERO_GRAD_STEPS = 2  # this many last logged steps with grad norm 0: the loss is flat
ZERO_STD_ALL = 0.999  # mean share of zero-variance GRPO groups counted as "every group"
REWARD_MEAN = re.compile(r"^rewards/(.+)/mean$")


# -- weights -------------------------------------------------------------------------------------------------
def weight_summary(model, trainable_only: bool = True) -> dict[str, Any]:
    """{"max_abs": max |w|, "non_finite": [names of tensors with NaN/inf], "tensors": n} over the trained weights
    (those that require grad; every weight with trainable_only=False)."""
    import torch

    largest, bad, count = 0.0, [], 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (trainable_only and not param.requires_grad) or param.numel() == 0 or not param.is_floating_point():
                continue  # frozen, a ZeRO-3 placeholder, or packed 4-bit data
            count += 1
            data = param.detach()
            if not torch.isfinite(data).all():
                bad.append(name)
                continue
            largest = max(largest, data.abs().max().float().item())
    return {"max_abs": largest, "non_finite": bad, "tensors": count}


def check_weights(model, start: dict[str, Any] | None, lr: float | None = None, trainable_only: bool = True,
                  run=None) -> dict:
    """The end-of-training weight summary; AlignError (the run fails) when weights are NaN/inf or exploded — then
    `run` (if given) records its `health` first."""
    end = weight_summary(model, trainable_only)
    try:
        return _diverged(end, start, lr)
    except AlignError:
        if run is not None and run.writer:
            run.update_manifest(health=assess(run.metrics(), None, start, end))
        raise


def _diverged(end: dict[str, Any], start: dict[str, Any] | None, lr: float | None) -> dict[str, Any]:
    hint = f" Lower --lr (it is {lr:g})" if lr is not None else " Lower the learning rate"
    if end["non_finite"]:
        names = end["non_finite"]
        raise AlignError(f"Training diverged: {len(names)} of {end['tensors']} trained weight tensors hold NaN/inf (e.g. "
                         f"{names[0]}); the run is marked failed and its weights must not be used.{hint}, or check the "
                         "data and --max-grad-norm.")
    before = (start or {}).get("max_abs") or 0.0
    if end["max_abs"] > EXPLODED and end["max_abs"] > GROWTH * before:
        raise AlignError(f"Training diverged: the trained weights grew to max |w| = {end['max_abs']:.3g} (from "
                         f"{before:.3g} at the start); the model no longer computes anything useful, and the run is "
                         f"marked failed.{hint}.")
    return end


# -- the rest, from metrics.jsonl and the training data ------------------------------------------------------
def _train_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "train_runtime" not in r and not any(k.startswith("eval") for k in r)]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def assess(records: list[dict[str, Any]], rows: list | None, start: dict | None, end: dict | None) -> dict[str, Any]:
    """The `health` section of run.json (see the module docstring) from the logged steps and the training rows."""
    train = _train_records(records)
    health: dict[str, Any] = {"weights": {"max_abs_start": (start or {}).get("max_abs"),
                                          "max_abs_end": (end or {}).get("max_abs"),
                                          "non_finite_tensors": len((end or {}).get("non_finite", []))}}
    warnings: list[str] = []

    norms = [(r.get("step"), _number(r.get("grad_norm"))) for r in train if _number(r.get("grad_norm")) is not None]
    flat = 0
    for _, norm in reversed(norms):
        if norm != 0.0:
            break
        flat += 1
    health["zero_grad_steps"] = flat
    if flat >= ZERO_GRAD_STEPS:
        losses = [_number(r.get("loss")) for r in train if _number(r.get("grad_norm")) == 0.0][-flat:]
        warnings.append(f"the gradient norm is 0 over the last {flat} logged steps (from step {norms[-flat][0]}; loss "
                        f"{losses[-1] if losses else '?'}): the loss is flat and nothing is learned — rewards without "
                        "signal, or weights saturated by a learning rate far too high")
    for key in ("loss", "grad_norm"):
        bad = [r.get("step") for r in train if _number(r.get(key)) is not None and not math.isfinite(r[key])]
        health[f"non_finite_{key}_steps"] = len(bad)
        if bad:
            warnings.append(f"the {key.replace('_', ' ')} is NaN/inf at {len(bad)} logged step(s) (first: step {bad[0]})")

    rewards: dict[str, dict[str, Any]] = {}
    for r in train:
        for key, value in r.items():
            match = REWARD_MEAN.match(key)
            if match and (value is None or _number(value) is not None):  # null / NaN: None for every sample
                entry = rewards.setdefault(match.group(1), {"steps": 0, "all_none_steps": 0, "values": []})
                entry["steps"] += 1
                if value is not None and math.isfinite(value):
                    entry["values"].append(float(value))
                else:
                    entry["all_none_steps"] += 1
    for name, entry in rewards.items():
        values = entry.pop("values")
        entry.update(min=min(values, default=None), max=max(values, default=None))
        if not values:
            warnings.append(f"reward '{name}' was None (not applicable) for every sample of the run: it gave no signal "
                            "— check the columns it reads and what it returns")
        elif entry["steps"] >= 2 and entry["min"] == entry["max"]:
            warnings.append(f"reward '{name}' was {entry['min']:g} at every logged step: a constant reward gives no "
                            "signal")
    if rewards:
        health["rewards"] = rewards
    shares = [_number(r.get("frac_reward_zero_std")) for r in train if _number(r.get("frac_reward_zero_std")) is not None]
    if shares:
        health["zero_std_groups"] = sum(shares) / len(shares)
        if health["zero_std_groups"] >= ZERO_STD_ALL:
            warnings.append("every GRPO group got the same reward for all its completions (zero variance): the "
                            "advantages were 0 and the policy learned nothing — make the reward denser or sample with "
                            "a higher temperature")

    pairs = [r for r in rows or [] if isinstance(r, dict) and "chosen" in r and "rejected" in r]
    if pairs:
        same = sum(r["chosen"] == r["rejected"] for r in pairs)
        health["identical_pairs"] = same / len(pairs)
        if same:
            warnings.append(f"{same} of {len(pairs)} training pairs have chosen == rejected: they teach nothing")
    health["warnings"] = warnings
    return health


def record(run, cfg, stage: str, rows: list | None, start: dict | None, end: dict | None) -> dict[str, Any]:
    """Assess the run, write `health` into run.json, log each warning; under --strict a warning fails the run."""
    health = assess(run.metrics(), rows, start, end)
    run.update_manifest(health=health)
    for warning in health["warnings"]:
        logger.warning("%s health: %s.", stage, warning)
    if health["warnings"] and getattr(cfg, "strict", False):
        raise AlignError(f"--strict: the {stage} run trained, but degenerately; it is marked failed:",
                         [w + "." for w in health["warnings"]]
                         + ["Fix the cause, or turn --strict off (`strict: false` in a pipeline) to keep such a run; "
                            "the warnings stay in run.json 'health' and in align report."])
    return health
