"""Checks of a pipeline file's blocks, run before anything trains (align.pipeline.resolve calls them and reports
every problem at once): stage names as safe path components, `defaults:` keys that some stage kind has, the `eval:`
block as `align eval` checks it (with its data loaded, to know the metrics it will produce), and gates against those
metrics."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from align.errors import AlignError, Problems, did_you_mean, unknown_name

STAGE_KEYS = {"name", "kind", "from", "gate"}  # a stage entry's keys that are not stage options
EVAL_KEYS = {"data", "split", "answer_column", "reward", "reward_model", "max_samples", "max_new_tokens",
             "batch_size", "num_samples", "temperature", "top_p", "backend", "vllm_memory", "tool", "environment",
             "max_tool_calls", "tool_timeout"}
TOOL_KEYS = ("tool", "environment", "max_tool_calls", "tool_timeout")
# the eval block's own key (not an `align eval` option): with tools, each policy is evaluated a second time without them
WITHOUT_TOOLS = "without_tools"


RESERVED_NAMES = {"report", "pipeline.json"}  # DIR/report/ is the pipeline's report, DIR/pipeline.json its summary
SAFE_NAME = re.compile(r"^[\w][\w.-]{0,99}$")


def stage_name_problem(name: str) -> str | None:
    """Why `name` cannot be a stage (its run directory is OUTPUT/name), or None."""
    if not SAFE_NAME.match(name) or name in RESERVED_NAMES:
        why = "a reserved name: the pipeline writes its own report/ and pipeline.json there" if name in RESERVED_NAMES \
            else "it must be one path component of at most 100 letters, digits, '_', '-' and '.', not starting with " \
                 "'.' or '-'"
        return (f"stage name {name!r} is not allowed ({why}): it names the stage's run directory inside the output "
                "directory. Rename the stage, e.g. 'sft' or 'dpo-2'.")
    return None


def default_problems(defaults: dict[str, Any], where: str) -> list[str]:
    """Every key of `defaults:` must be an option of at least one stage kind (a typo would otherwise vanish)."""
    from align.stages import KINDS, stage_parts

    known = {f.name for kind in KINDS for f in dataclasses.fields(stage_parts(kind)[0])} - {"output", "config"}
    out = []
    for raw_key in defaults:
        key = str(raw_key).replace("-", "_")
        if raw_key in STAGE_KEYS or key == "output":
            out.append(f"{where}: defaults: '{raw_key}' cannot be a default; set it on each stage (or the pipeline's "
                       "'output').")
        elif key not in known:
            out.append(f"{where}: defaults: unknown option '{raw_key}'.{did_you_mean(key, known)} Defaults are stage "
                       "options (as in `align sft --help`, `align dpo --help`, ...); each stage that has it takes it.")
    return out


def eval_problems(evaluation: dict[str, Any], model: Any, where: str, problems: Problems) -> set[str] | None:
    """Check the eval block as `align eval` checks its options, and load its data; returns the metrics it will produce
    for a policy (None when unknown: no eval data, or a problem was found)."""
    from align.evaluation import EvalConfig, load_eval_data

    if not evaluation:
        return None
    allowed = EVAL_KEYS | {WITHOUT_TOOLS}
    for key in evaluation:
        if key not in allowed:
            problems.add(f"{where}: eval: unknown key '{key}'.{did_you_mean(key, allowed)} Allowed: "
                         f"{', '.join(sorted(allowed))}.")
    if WITHOUT_TOOLS in evaluation:
        if not isinstance(evaluation[WITHOUT_TOOLS], bool):
            problems.add(f"{where}: eval: without_tools must be true or false, got {evaluation[WITHOUT_TOOLS]!r}.")
        elif evaluation[WITHOUT_TOOLS] and not (evaluation.get("tool") or evaluation.get("environment")):
            problems.add(f"{where}: eval: without_tools: true evaluates each policy a second time without the eval "
                         "block's tools, but it names none; set tool (or environment), or drop without_tools.")
    options = {"backend": "hf", **{k: v for k, v in evaluation.items() if k in EVAL_KEYS}}
    try:
        cfg = EvalConfig.from_kwargs(source=f"{where}: eval", **options, target=str(model or "pipeline"))
    except AlignError as e:
        problems.extend(e.problems or [str(e)])
        return None
    problems.extend(f"{where}: eval: {p}" for p in cfg.problems().items  # the target is each stage, data optional
                    if not p.startswith(("Give a run", str(cfg.target), "--data is required")))
    if not cfg.data or offline_hub_id(cfg.data):
        return None
    try:
        kind, rows = load_eval_data(cfg)
    except AlignError as e:
        problems.add(f"{where}: eval: data: {e}")
        return None
    rewards: set[str] = set()
    if cfg.reward or cfg.reward_model:
        from align.rewards.registry import resolve_rewards

        try:
            rewards = {"reward", *(f"reward/{r.name}" for r in resolve_rewards([*cfg.reward, *filter(None, [cfg.reward_model])]))}
        except AlignError as e:
            problems.extend(f"{where}: eval: {p}" for p in e.problems or [str(e)])
    if kind == "pairs":
        return {"preference_accuracy", "margin"}
    metrics = {"completion_length", "kl", *rewards}
    if cfg.answer_column in rows[0]:
        metrics |= {"accuracy", *([f"pass@{cfg.num_samples}"] if cfg.num_samples > 1 else [])}
    return metrics


def gate_problems(gate: Any, kind: str, evaluation: dict[str, Any], metrics: set[str] | None) -> list[str]:
    """A gate is {metric: NAME, min_delta: NUMBER} on a policy stage, NAME one of the metrics the eval block gives."""
    from align.stages import POLICY_KINDS

    if not isinstance(gate, dict) or "metric" not in gate or set(gate) - {"metric", "min_delta"}:
        return [f"gate must be {{metric: NAME, min_delta: NUMBER}}, got {gate!r}."]
    if kind not in POLICY_KINDS:
        return [f"a gate compares held-out metrics of policies; a {kind} stage has none."]
    if not evaluation.get("data"):
        return ["a gate needs the pipeline's eval block (eval: {data: HELD_OUT})."]
    out = []
    delta = gate.get("min_delta", 0.0)
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta):
        out.append(f"gate: min_delta must be a finite number (the least change of the metric vs the parent, e.g. 0.0 "
                   f"or -0.02), got {delta!r}.")
    metric = gate["metric"]
    if metrics is not None and metric not in metrics:
        out.append(f"gate: {unknown_name('metric', str(metric), metrics)[:-1]} (what the eval block measures on its "
                   "data).")
    return out


def offline_hub_id(spec: str | None) -> bool:
    """A dataset spec that names a hub dataset while the hub is offline (it cannot be validated now)."""
    from align.data.loading import hub_offline, looks_like_path, near_bundled
    from align.data.samples import is_bundled

    return bool(spec) and hub_offline() and not Path(spec).exists() and not looks_like_path(spec) \
        and not is_bundled(spec) and not near_bundled(spec)
