"""`align run PIPELINE.yaml`: several stages as one thing, each starting from another, evaluated side by side.

    model: BASE                  # hub id or local dir
    output: DIR                  # DIR/<stage name>/ is each stage's run directory; DIR/pipeline.json the summary
    seed: 3                      # every stage's seed unless it sets its own
    defaults: {adapter: lora}    # any stage option, for every stage that has it; a stage's own keys win
    eval: {data: PROMPTS, max_samples: 500, max_new_tokens: 8}   # held-out eval of the base and every policy stage
    stages:
      - {name: sft, kind: sft, data: FILE, max_steps: 6}
      - {name: pairs, kind: pairs, data: PROMPTS, reward: [accuracy]}   # on-policy pairs from sft
      - {name: dpo, kind: dpo, data: pairs, gate: {metric: accuracy, min_delta: 0.0}}
      - {name: rm, kind: rm, from: sft, data: pairs}
      - {name: ppo, kind: ppo, from: sft, data: PROMPTS, reward_model: rm}

Stage kinds: sft, rm, dpo, kto, orpo, simpo, grpo, ppo, pairs, distill. `from` defaults to the previous policy stage
(the first stage starts from `model`). A stage name works wherever a run path does: `from`, `reward_model`, a distill
stage's `teacher`, `reward` specs (`rm@0.5`), and `data` / `eval_data` (a pairs stage: its pairs.jsonl).

Order of work: the whole pipeline is validated first — every stage's options, data, reward specs, kinds, names
(unknown, duplicate, forward references), a ppo/grpo without a reward — and every problem is reported at once,
naming its stage (exit 2). Then each stage is planned: `skip` (completed with the same resolved config and data
hashes), `resume` (interrupted: continues from its checkpoint), `run`, or `rerun` (`--force`: a completed stage
whose config or data changed, or whose artifacts no longer verify — a weight file deleted, truncated or replaced —
and everything downstream of it). Without --force such a change is refused (exit 2, naming the stage and the
changed keys or files). `--dry-run` prints the plan and stops.

One `align run` at a time per output directory: it holds the directory's writer lock (align.integrity) from planning
to the end, each stage takes its run directory's lock while it runs, and a stage directory locked by another process
(e.g. an `align sft -o DIR/sft`) is refused before anything runs. A stage whose directory would be, contain or lie
inside one of its inputs is refused at planning.

After every policy stage (and for the base, before the first) the `eval` block runs `align eval` (align.evaluation —
the same code as the command) on held-out data, with the KL to the stage's parent; rm stages are evaluated on their
own `eval_data` pairs. With tools in the block (`tool`/`environment`), `without_tools: true` evaluates each policy a
second time on the same prompts with no tools offered (the table's "acc. without tools"). A stage with `gate:
{metric: M, min_delta: X}` must reach parent's M + X, else the pipeline stops with exit code 3 (GATE_EXIT) before
the stages after it spend compute. DIR/pipeline.json holds the resolved pipeline, each stage's status, run
directory, lineage, final metrics and held-out metrics.

A ppo/grpo stage trained on a reward model gets the eval block's rewards and (when its data has an answer column)
accuracy as gold metrics (`gold_reward`, align.stages.gold) unless it names its own. A stage with `keep_best: METRIC`
hands its best held-out step's policy to the next stage (it is the run's adapter) and pipeline.json records it as the
stage's `best: {metric, mode, step, value}`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import GIVEN, Config, mark_given, opt
from align.errors import AlignError, Problems, did_you_mean, unknown_name
from align.io import read_json
from align.pipeline_checks import (
    EVAL_KEYS,
    STAGE_KEYS,
    TOOL_KEYS,
    WITHOUT_TOOLS,
    default_problems,
    eval_problems,
    gate_problems,
    offline_hub_id,
    stage_name_problem,
)

logger = logging.getLogger(__name__)

GATE_EXIT = 3
TOP_KEYS = {"model", "output", "seed", "defaults", "eval", "stages"}
REF_FIELDS = ("from_run", "reward_model", "teacher", "data", "eval_data")  # where a stage name stands for its run
IGNORED_CHANGES = {"resume", "overwrite", "config", "strict"}


class GateFailed(AlignError):
    """A stage's held-out metric regressed past its gate; the CLI exits with GATE_EXIT."""

    exit_code = GATE_EXIT


@dataclass
class RunConfig(Config):
    positional = "pipeline"
    pipeline: str | None = opt(None, "The pipeline YAML file (model, output, seed, defaults, eval, stages).")
    dry_run: bool = opt(False, "Validate and print the plan (each stage: parent, skip / resume / run) without training.")
    force: bool = opt(False, "Rerun completed stages whose config or data changed, and everything downstream.")

    def check(self, problems: Problems) -> None:
        if not self.pipeline:
            problems.add("Give the pipeline file: align run pipeline.yaml.")


@dataclass
class Stage:
    """One resolved stage: its config object, what it references, and the plan for it."""

    name: str
    kind: str
    cfg: Any
    parent: str | None  # a stage name, or None (the base model)
    refs: set[str]  # every stage this one reads (parent, reward model, pairs data)
    gate: dict[str, Any] | None
    action: str = "run"
    changes: list[str] = dataclasses.field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output)


# -- loading and resolving -----------------------------------------------------------------------------------
def read_pipeline(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(the pipeline mapping, where it came from) from a YAML file or a dict."""
    if isinstance(source, dict):
        return source, "pipeline"
    from align.config import read_yaml_mapping

    return read_yaml_mapping(source, "Pipeline file", "align run"), str(source)


def _stage_ref(value: Any, names: dict[str, str], output: Path) -> tuple[Any, str | None]:
    """A stage name -> its run directory (or its pairs file for a pairs stage); anything else unchanged."""
    if isinstance(value, str) and value in names:
        run = output / value
        return (str(run / "pairs.jsonl") if names[value] == "pairs" else str(run)), value
    return value, None


def _reward_ref(spec: str, names: dict[str, str], output: Path) -> tuple[str, str | None]:
    """A reward spec whose source is a stage name (`rm@0.5`, `rm(head="helpful")`) with that stage's run path."""
    source, paren, rest = spec.partition("(")
    if not paren:
        source, at, rest = spec.partition("@")
        paren = at
    if source in names:
        return str(output / source) + paren + rest, source
    return spec, None


def resolve(raw: dict[str, Any], where: str) -> tuple[dict[str, Any], list[Stage]]:
    """Check the pipeline and build every stage's config; one AlignError lists every problem, by stage."""
    from align.config import coerce_mapping
    from align.stages import KINDS, POLICY_KINDS, stage_parts

    problems = Problems()
    for key in raw:
        if key not in TOP_KEYS:
            problems.add(f"{where}: unknown top-level key '{key}'.{did_you_mean(key, TOP_KEYS)} "
                         f"Allowed: {', '.join(sorted(TOP_KEYS))}.")
    if not raw.get("output"):
        problems.add(f"{where}: 'output' is required (the directory that holds one run directory per stage).")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        problems.add(f"{where}: 'stages' must be a non-empty list of stages ({{name, kind, ...}}).")
        stages_raw = []
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.add(f"{where}: 'defaults' must be a mapping of option: value.")
        defaults = {}
    problems.extend(default_problems(defaults, where))
    evaluation = raw.get("eval") or {}
    if not isinstance(evaluation, dict):
        problems.add(f"{where}: 'eval' must be a mapping (data, max_samples, ...).")
        evaluation = {}
    reported = len(problems.items)
    eval_metrics = eval_problems(evaluation, raw.get("model"), where, problems)
    # a broken eval block is reported once: its stages' default gold does not guess at accuracy and fail again
    gold_metrics = set() if len(problems.items) > reported else eval_metrics
    output = Path(str(raw.get("output") or "."))
    if raw.get("output"):
        from align.io import output_path_problem

        problem = output_path_problem(output, "output:")
        if problem:
            problems.add(f"{where}: {problem}")

    names: dict[str, str] = {}
    for i, entry in enumerate(stages_raw):
        if not isinstance(entry, dict):
            problems.add(f"{where}: stage #{i + 1} must be a mapping with name and kind.")
            continue
        name, kind = entry.get("name"), entry.get("kind")
        if not name or not isinstance(name, str):
            problems.add(f"{where}: stage #{i + 1} has no 'name'." if not name else
                         f"{where}: stage #{i + 1}: name must be a string, got {name!r} (quote it: name: '{name}').")
        elif (problem := stage_name_problem(name)) is not None:
            problems.add(f"{where}: stage #{i + 1}: {problem}")
        elif name in names:
            problems.add(f"{where}: stage name '{name}' is used twice; names must be unique (they are run directories).")
        elif kind in KINDS:
            names[name] = kind
        if kind not in KINDS:
            problems.add(f"{where}: stage '{name or i + 1}': " + unknown_name("stage kind", str(kind), KINDS))

    stages: list[Stage] = []
    seen: dict[str, str] = {}
    previous_policy: str | None = None
    for entry in stages_raw:
        if not isinstance(entry, dict) or entry.get("name") not in names or entry.get("name") in seen:
            continue
        name, kind = entry["name"], entry["kind"]
        label = f"{where}: stage '{name}'"
        cls = stage_parts(kind)[0]
        fields = {f.name for f in dataclasses.fields(cls)}
        options = {k: v for k, v in defaults.items() if str(k).replace("-", "_") in fields}
        options.update({k: v for k, v in entry.items() if k not in STAGE_KEYS})
        given = {str(k).replace("-", "_") for k in options}  # what the file sets (a default may be fitted, not these)
        refs: set[str] = set()
        parent = entry.get("from", previous_policy)
        if "from" in entry and entry["from"] not in names and isinstance(entry["from"], str) \
                and not Path(entry["from"]).is_dir():
            problems.add(f"{label}: from '{entry['from']}' is neither a stage of this pipeline "
                         f"({', '.join(names)}) nor a run directory.{did_you_mean(entry['from'], names)}")
            parent = None
        if parent in names:
            if parent not in seen:
                problems.add(f"{label}: from '{parent}' refers to a stage that comes later (or to itself); stages "
                             "run in order, so a stage can only start from an earlier one.")
            elif seen[parent] not in POLICY_KINDS:
                problems.add(f"{label}: from '{parent}' is a {seen[parent]} stage, not a policy "
                             f"({', '.join(POLICY_KINDS)}).")
            refs.add(parent)
            options["from"] = str(output / parent)
        elif parent:
            options["from"] = parent
        else:
            options.setdefault("model", raw.get("model"))
            if not raw.get("model") and not options.get("model"):
                problems.add(f"{label}: no parent: set the pipeline's 'model' or the stage's 'from'.")
        for key in ("reward_model", "teacher", "data", "eval_data"):
            if key in options:
                options[key], ref = _stage_ref(options[key], names, output)
                if ref:
                    refs.add(ref)
                if ref and key == "teacher" and names[ref] not in POLICY_KINDS:
                    problems.add(f"{label}: teacher '{ref}' is a {names[ref]} stage, not a policy "
                                 f"({', '.join(POLICY_KINDS)}).")
        if "reward" in options:
            specs = options["reward"] if isinstance(options["reward"], list) else [options["reward"]]
            resolved = [_reward_ref(str(s), names, output) for s in specs]
            options["reward"] = [r[0] for r in resolved]
            refs.update(r[1] for r in resolved if r[1])
        if "gold_reward" in fields and "gold_reward" not in options and _uses_reward_model(options, refs, names):
            options["gold_reward"] = default_gold(evaluation, options.get("reward") or [], gold_metrics)
        for ref in refs - {parent}:
            if ref not in seen:
                problems.add(f"{label}: '{ref}' refers to a stage that comes later; reorder the stages.")
        if "seed" in fields and "seed" in raw:
            options.setdefault("seed", raw["seed"])
        if "strict" in fields:  # a pipeline stops at a degenerate stage unless told otherwise (strict: false)
            options.setdefault("strict", True)
        options["output"] = str(output / name)
        gate = entry.get("gate")
        if gate is not None:
            problems.extend(f"{label}: {p}" for p in gate_problems(gate, kind, evaluation, eval_metrics))
        try:
            cfg = mark_given(cls(**coerce_mapping(cls, options, label)), given)
        except AlignError as e:
            problems.extend(e.problems or [str(e)])
            seen[name] = kind
            continue
        stages.append(Stage(name, kind, cfg, parent if parent in names else None, refs, gate))
        seen[name] = kind
        if kind in POLICY_KINDS:
            previous_policy = name
    problems.extend(_stage_problems(stages, where))
    problems.raise_if_any(f"Invalid pipeline {where}:")
    return {**raw, "output": str(output), "defaults": defaults, "eval": evaluation}, stages


def _uses_reward_model(options: dict[str, Any], refs: set[str], names: dict[str, str]) -> bool:
    """Is a reward model (a run of an rm stage, or --reward-model) among the stage's rewards?"""
    return bool(options.get("reward_model")) or any(names.get(ref) == "rm" for ref in refs)


def default_gold(evaluation: dict[str, Any], proxies: list[str], metrics: set[str] | None = None) -> list[str]:
    """An RL stage on a reward model measures what the eval block measures, as gold metrics (align.stages.gold): its
    rewards and, when its data has an answer column (`metrics`, the eval block's metrics, has accuracy; unknown:
    assumed), accuracy — those the stage does not already train on."""
    if not evaluation.get("data"):
        return []
    column = evaluation.get("answer_column", "answer")
    accuracy = "accuracy" if column == "answer" else f"accuracy(column={column!r})"
    specs = [*(evaluation.get("reward") or []), *([accuracy] if metrics is None or "accuracy" in metrics else [])]
    return [s for s in dict.fromkeys(str(s) for s in specs) if s not in proxies]


def _stage_problems(stages: list[Stage], where: str) -> list[str]:
    """Each stage's own validation (options, data, rewards), with references to not-yet-run stages left out."""
    from align.stages import stage_parts

    out: list[str] = []
    for stage in stages:
        label = f"{where}: stage '{stage.name}'"
        cfg = stage.cfg
        pending = {f for f in REF_FIELDS if _refers_to_pending(getattr(cfg, f, None), stage)}
        specs = [s for s in getattr(cfg, "reward", []) if _refers_to_pending(s.partition("@")[0].partition("(")[0], stage)]
        check = dataclasses.replace(cfg, **{f: None for f in pending if f in ("reward_model", "teacher", "eval_data")},
                                    **({"reward": [s for s in cfg.reward if s not in specs]} if specs else {}))
        has_pending_reward = bool(specs) or "reward_model" in pending
        for problem in check.problems().items:
            if problem.startswith("Give at least one reward") and has_pending_reward:
                continue
            if problem.startswith("--teacher is required") and "teacher" in pending:
                continue
            out.append(f"{label}: {problem}")
        if offline_hub_id(cfg.data) or offline_hub_id(getattr(cfg, "eval_data", None)):
            logger.warning("%s: data on the model hub cannot be checked offline (%s); it is loaded when the stage "
                           "starts.", label, cfg.data)
        elif "data" not in pending and cfg.data:
            loader = stage_parts(stage.kind)[2]
            try:
                loader(dataclasses.replace(check, eval_data=None) if "eval_data" in pending else check)
            except AlignError as e:
                out.append(f"{label}: {e}")
    return out


def _refers_to_pending(value: Any, stage: Stage) -> bool:
    """Does `value` point into the run directory of a stage this one references (which may not exist yet)?"""
    if not isinstance(value, str):
        return False
    root = stage.run_dir.parent
    return any(value == str(root / ref) or value == str(root / ref / "pairs.jsonl") for ref in stage.refs)


# -- planning ------------------------------------------------------------------------------------------------
def stage_changes(stage: Stage, manifest: dict[str, Any]) -> list[str]:
    """Config keys (and data hashes) that differ between the recorded run and this stage's resolved config."""
    from align.runs import sha256_path, verify_run
    from align.stages.common import config_changes

    fitted = manifest.get("fitted_defaults") or {}  # a default the stage lowered to fit the model is no change
    changed = [f"{k} ({old!r} -> {new!r})" for k, (old, new) in config_changes(manifest.get("config", {}), stage.cfg).items()
               if k not in IGNORED_CHANGES and list(fitted.get(k) or ()) != [new, old]]
    if manifest.get("status") == "completed":
        changed.extend(verify_run(stage.run_dir, manifest))
    else:
        from align.runs import Run

        run = Run(stage.run_dir)
        if run.last_checkpoint() is None and run.damaged_checkpoints():
            changed.append(f"no checkpoint in {run.checkpoints_dir} verifies (see the warnings above)")

    for split, described in (manifest.get("datasets") or {}).items():
        path, digest = (described or {}).get("path"), (described or {}).get("sha256")
        if path and digest and sha256_path(path) != digest:
            changed.append(f"{split} data {path} (its contents changed)")
    return changed


def plan(stages: list[Stage], force: bool) -> None:
    """Set each stage's action (skip / resume / run / rerun); refuse changed completed stages unless `force`."""
    from align.integrity import check_not_source, check_unlocked, command_inputs
    from align.runs import read_manifest

    rerun: set[str] = set()
    refused: list[str] = []
    for stage in stages:
        try:
            check_not_source(stage.run_dir, command_inputs(stage.cfg), flag=f"stage '{stage.name}': its run directory")
            check_unlocked(stage.run_dir, f"stage '{stage.name}': its run directory {stage.run_dir}")
        except AlignError as e:
            raise AlignError(f"Cannot run the pipeline: {e}") from None
        manifest_path = stage.run_dir / "run.json"
        upstream = stage.refs & rerun
        if not manifest_path.is_file():
            stage.action = "run"
            if stage.run_dir.is_dir() and any(stage.run_dir.iterdir()):
                stage.changes.append("its directory holds files but no run.json")
                if force:
                    stage.action = "rerun"
                else:
                    refused.append(f"stage '{stage.name}': {stage.run_dir} holds files but no run.json (not a run); "
                                   "move them away")
        else:
            manifest = read_manifest(stage.run_dir)
            stage.changes = stage_changes(stage, manifest)
            if upstream:
                stage.changes.append(f"upstream stage(s) {', '.join(sorted(upstream))} rerun")
            status = manifest.get("status")
            if status == "completed" and not stage.changes:
                stage.action = "skip"
            elif status != "completed" and not stage.changes:
                stage.action = "resume"
            elif force:
                stage.action = "rerun"
            else:
                refused.append(f"stage '{stage.name}' ({status}, {stage.run_dir}) changed: " + "; ".join(stage.changes))
        if stage.action != "skip":
            rerun.add(stage.name)
    if refused:
        raise AlignError("The pipeline differs from the runs already in its output directory. Pass --force to rerun "
                         "these stages and everything downstream, or restore the previous settings:", refused)


def describe_plan(stages: list[Stage]) -> str:
    lines = ["stage        kind   from         action"]
    for s in stages:
        lines.append(f"{s.name:<12} {s.kind:<6} {(s.parent or 'base'):<12} {s.action}"
                     + (f"  ({'; '.join(s.changes)})" if s.changes else ""))
    return "\n".join(lines)


# -- running -------------------------------------------------------------------------------------------------
def _eval_config(evaluation: dict[str, Any], target: str, data: str | None = None):
    from align.evaluation import EvalConfig

    options = {"backend": "hf", **{k: v for k, v in evaluation.items() if k in EVAL_KEYS}}  # hf unless asked
    options.update(target=target, **({"data": data} if data else {}))
    return EvalConfig.from_kwargs(source="eval", **options)


def evaluate_stage(evaluation: dict[str, Any], target: str, kind: str, cfg=None) -> dict[str, Any] | None:
    """Held-out metrics of a stage (or the base): prompts for policies, its own eval pairs for an rm."""
    from align.evaluation import evaluate

    if kind == "rm":
        eval_data = getattr(cfg, "eval_data", None)
        return evaluate(_eval_config(evaluation, target, eval_data)) if eval_data else None
    if kind == "pairs" or not evaluation.get("data"):
        return None
    metrics = evaluate(_eval_config(evaluation, target))
    if evaluation.get(WITHOUT_TOOLS):  # the same policy on the same prompts with no tools offered, beside it
        metrics[WITHOUT_TOOLS] = evaluate(_eval_config({k: v for k, v in evaluation.items() if k not in TOOL_KEYS},
                                                       target))
    return metrics


class Pipeline:
    """Runs resolved stages in order, keeping DIR/pipeline.json up to date."""

    def __init__(self, spec: dict[str, Any], stages: list[Stage], source: str):
        self.spec, self.stages, self.source = spec, stages, source
        self.output = Path(spec["output"])
        self.path = self.output / "pipeline.json"
        previous = read_json(self.path, "pipeline summary") if self.path.is_file() else {}
        if previous.get("eval") != spec.get("eval"):  # another held-out set: earlier numbers do not compare
            previous = {"stages": [{k: v for k, v in s.items() if k != "eval"} for s in previous.get("stages", [])]}
        self.previous = {s["name"]: s for s in previous.get("stages", [])}
        self.base_eval = previous.get("base", {}).get("eval")
        self.records: dict[str, dict[str, Any]] = {}
        self.status = "running"

    def save(self) -> dict[str, Any]:
        """Write DIR/pipeline.json (atomically) and return its content."""
        from align.runs import write_json_atomic

        self.output.mkdir(parents=True, exist_ok=True)
        stages = [self.records.get(s.name) or {**self.previous.get(s.name, {}), "name": s.name, "kind": s.kind,
                                                  "run": str(s.run_dir), "status": "pending"} for s in self.stages]
        data = {"pipeline": self.source, "status": self.status, "model": self.spec.get("model"),
                "output": str(self.output), "seed": self.spec.get("seed"), "defaults": self.spec.get("defaults"),
                "eval": self.spec.get("eval"), "base": {"model": self.spec.get("model"), "eval": self.base_eval},
                "stages": stages, "table": table_rows(self.base_eval, stages)}
        write_json_atomic(self.path, data)
        return json.loads(json.dumps(data, default=str))

    def parent_eval(self, stage: Stage) -> dict[str, Any] | None:
        if stage.parent is None:
            return self.base_eval
        return (self.records.get(stage.parent) or {}).get("eval")

    def run_stage(self, stage: Stage) -> None:
        from align.runs import read_manifest
        from align.stages import stage_parts

        cfg = stage.cfg
        if stage.action == "skip":
            logger.info("Stage '%s': completed with the same config and data; skipped.", stage.name)
        else:
            logger.info("Stage '%s' (%s): %s.", stage.name, stage.kind, stage.action)
            from align.integrity import writer_scope

            cfg = mark_given(dataclasses.replace(cfg, resume=stage.action == "resume", overwrite=stage.action == "rerun"),
                             getattr(cfg, GIVEN, ()))
            with writer_scope():  # the stage's run directory is locked while it runs
                stage_parts(stage.kind)[1](cfg)
        manifest = read_manifest(stage.run_dir)
        old = self.previous.get(stage.name, {})
        evaluation = old.get("eval") if stage.action == "skip" and "eval" in old else \
            evaluate_stage(self.spec["eval"], str(stage.run_dir), stage.kind, stage.cfg)
        self.records[stage.name] = {
            "name": stage.name, "kind": stage.kind, "run": str(stage.run_dir), "from": stage.parent or "base",
            "action": stage.action, "status": manifest.get("status"), "lineage": manifest.get("lineage"),
            "metrics": manifest.get("metrics"), "eval": evaluation,
            **({"best": manifest["best"]} if manifest.get("best") else {})}
        self.save()
        if stage.gate:
            self.check_gate(stage, evaluation)

    def record_stopped(self, stage: Stage) -> None:
        """The status (failed, interrupted) and error of the stage that stopped the pipeline, from its run.json."""
        try:
            from align.runs import read_manifest

            manifest = read_manifest(stage.run_dir)
        except AlignError:
            return
        self.records[stage.name] = {"name": stage.name, "kind": stage.kind, "run": str(stage.run_dir),
                                    "from": stage.parent or "base", "action": stage.action,
                                    "status": manifest.get("status"), "error": manifest.get("error")}

    def check_gate(self, stage: Stage, evaluation: dict[str, Any] | None) -> None:
        metric, min_delta = stage.gate["metric"], float(stage.gate.get("min_delta", 0.0))
        parent = self.parent_eval(stage)
        if evaluation is None or parent is None or metric not in evaluation or metric not in parent:
            raise AlignError(f"stage '{stage.name}': gate metric '{metric}' is not in the held-out metrics "
                             f"({', '.join(k for k in (evaluation or {}) if k != 'examples')}).")
        delta = evaluation[metric] - parent[metric]
        self.records[stage.name]["gate"] = {"metric": metric, "min_delta": min_delta, "delta": delta,
                                            "passed": delta >= min_delta}
        if delta < min_delta:
            self.status = "gated"
            self.save()
            raise GateFailed(f"Gate failed after stage '{stage.name}': held-out {metric} {evaluation[metric]:.4f} vs "
                             f"{parent[metric]:.4f} for its parent ({stage.parent or 'base'}): change {delta:+.4f} < "
                             f"min_delta {min_delta:+.4f}. The stages after it were not run. Fix the stage's settings "
                             "and rerun (add --force if it completed), or lower the gate.")

    def run(self) -> dict[str, Any]:
        if self.base_eval is None and self.spec["eval"].get("data") and self.spec.get("model"):
            self.base_eval = evaluate_stage(self.spec["eval"], str(self.spec["model"]), "base")
        self.save()
        stage = None
        try:
            for stage in self.stages:
                self.run_stage(stage)
        except GateFailed:
            raise
        except BaseException as e:
            self.status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            if stage is not None and stage.name not in self.records and (stage.run_dir / "run.json").is_file():
                self.record_stopped(stage)
            self.save()
            raise
        self.status = "completed"
        return self.save()


# -- the table -----------------------------------------------------------------------------------------------
TABLE_METRICS = ("accuracy", "reward", "kl", "preference_accuracy")


def table_rows(base_eval: dict[str, Any] | None, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def metrics(evaluation: dict[str, Any] | None) -> dict[str, Any]:
        evaluation = evaluation or {}
        out = {m: evaluation.get(m) for m in TABLE_METRICS}
        if WITHOUT_TOOLS in evaluation:  # eval: {without_tools: true}: the accuracy with no tools offered
            out["accuracy_without_tools"] = (evaluation[WITHOUT_TOOLS] or {}).get("accuracy")
        return out

    rows = [{"stage": "base", "kind": "-", "from": "-", **metrics(base_eval)}]
    rows += [{"stage": s["name"], "kind": s["kind"], "from": s.get("from", "-"), **metrics(s.get("eval"))}
             for s in stages]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = [*TABLE_METRICS, *(["accuracy_without_tools"] if any("accuracy_without_tools" in r for r in rows) else [])]
    cells = [["stage", "kind", "from", "held-out acc", "mean reward", "KL to parent", "pref. acc", "acc. without tools"]
             [: 3 + len(columns)]]
    for r in rows:
        cells.append([r["stage"], r["kind"], r["from"]] + [
            "-" if r.get(m) is None else (f"{100 * r[m]:.1f}%" if "accuracy" in m else f"{r[m]:.3f}") for m in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def run_pipeline(source: str | Path | dict[str, Any], *, dry_run: bool = False, force: bool = False) -> dict[str, Any]:
    """Validate, plan and run a pipeline; returns the content of DIR/pipeline.json (or the plan with dry_run)."""
    from align.integrity import lock

    raw, where = read_pipeline(source)
    spec, stages = resolve(raw, where)
    if not dry_run:
        lock(spec["output"], f"The pipeline output {spec['output']}")
    plan(stages, force)
    if dry_run:
        return {"plan": [{"name": s.name, "kind": s.kind, "from": s.parent or "base", "action": s.action,
                          "changes": s.changes} for s in stages], "text": describe_plan(stages)}
    logger.info("Plan:\n%s", describe_plan(stages))
    return Pipeline(spec, stages, where).run()


def main(cfg: RunConfig) -> str:
    cfg.validate()
    result = run_pipeline(cfg.pipeline, dry_run=cfg.dry_run, force=cfg.force)
    if cfg.dry_run:
        return result["text"]
    return f"{result['output']}/pipeline.json\n" + format_table(result["table"])
