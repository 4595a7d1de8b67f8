"""The demo on several seeds: build the base with `align tiny-model --seed S`, run a recipe (README command 1's
`recipes/demo.yaml` by default) with pipeline seed S, and print one table over the seeds.

    python bench/demo_seeds.py                          # seeds 1-5, recipes/demo.yaml, runs under runs/seeds/
    python bench/demo_seeds.py --seeds 3 4 --out runs/s34
    python bench/demo_seeds.py --smoke                  # tiny steps, one seed: checks that every stage ran

For every stage the table shows its held-out metric on each seed (policies: on the recipe's `eval` data, greedy,
task accuracy when it has answers, else the mean of its eval rewards — the demo's: the `positive` verifier; reward
models: preference accuracy on their `eval_data` pairs), the mean, the range (min–max) and the change over the
stage's parent (mean and range); policy stages also show the KL to their parent. Then the wall time of each seed's
`align run` (base build excluded). The per-seed pipeline.json files stay under --out and a summary is written to
OUT/summary.json. Rerunning with the same --out skips completed stages (align run's own rule) and reports the first
run's wall time, so seeds run in separate processes can be tabled together afterwards.

The base options are README command 1's (`--split-digits --num-heads 8 --initializer-range 0.02`). `--smoke` keeps
the recipe's stages but trains each for a couple of steps on a few prompts (sft a few dozen, so that its completions
have the task's form), scores the pairs stages with a graded reward (`closeness` where the recipe's is `accuracy`,
else `length`: a barely trained policy is never right, nor positive and on topic, and pairs need different scores)
and evaluates on 16 prompts: a check that the script and every stage work, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE_OPTIONS = {"split_digits": True, "num_heads": 8, "initializer_range": 0.02}  # README command 1
SMOKE_STEPS = {"sft": 40}  # other training stages: 2 steps


def smoke_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The recipe shrunk to a few steps and prompts (same stages, same hand-offs)."""
    spec = copy.deepcopy(spec)
    spec["eval"] = {**spec.get("eval", {}), "max_samples": 16, "batch_size": 16}
    # strict: false — two steps of a random base learn nothing, so a constant reward is expected here, not a fault
    spec["defaults"] = {**spec.get("defaults", {}), "logging_steps": 1, "strict": False}
    for stage in spec["stages"]:
        kind = stage["kind"]
        if kind == "pairs":
            # a barely trained policy is never right (nor positive and on topic): a graded reward makes pairs
            dense = "closeness(scale=10)" if stage.get("reward") == ["accuracy"] else "length(max_length=32, cache=32)"
            stage.update(max_prompts=16, reward=[dense])
        else:
            stage["max_steps"] = SMOKE_STEPS.get(kind, 2)
        if kind in ("grpo", "ppo"):
            stage.update(batch_size=16, num_generations=min(stage.get("num_generations", 8), 4))
        if kind in ("rm", "dpo"):
            stage["batch_size"] = 8
    return spec


def run_seed(recipe: dict[str, Any], seed: int, out: Path, smoke: bool) -> dict[str, Any]:
    import align
    from align.tiny import build_tiny_model

    base = out / f"seed-{seed}" / "base"
    if not (base / "config.json").is_file():
        build_tiny_model(base, seed=seed, **BASE_OPTIONS)
    spec = smoke_spec(recipe) if smoke else copy.deepcopy(recipe)
    spec.update(model=str(base), output=str(out / f"seed-{seed}" / "demo"), seed=seed)
    start = time.monotonic()
    result = align.run(spec)
    wall = time.monotonic() - start
    record = Path(spec["output"]) / "wall_s.json"  # a rerun that skips every completed stage keeps the first timing
    if all(s.get("action") == "skip" for s in result["stages"]) and record.is_file():
        wall = json.loads(record.read_text())["wall_s"]
    else:
        record.write_text(json.dumps({"wall_s": wall}) + "\n")
    return {"seed": seed, "wall_s": wall, "table": result["table"], "status": result["status"],
            "stages": [(s["name"], s["status"]) for s in result["stages"]]}


def _pct(values: list[float | None]) -> list[float | None]:
    return [None if v is None else 100 * v for v in values]


def _spread(values: list[float | None], digits: int = 1) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if len(known) == 1:
        return f"{known[0]:.{digits}f}"
    return f"{statistics.fmean(known):.{digits}f} ({min(known):.{digits}f}–{max(known):.{digits}f})"


def gold(row: dict[str, Any]) -> float | None:
    """A policy's held-out metric: task accuracy when the eval data has answers, else the eval block's mean reward
    (the demo's: the `positive` verifier)."""
    return row.get("accuracy") if row.get("accuracy") is not None else row.get("reward")


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage: the held-out metric per seed (in %), its change over the parent, and the KL to the parent."""
    stages: dict[str, dict[str, Any]] = {}
    for result in results:
        rows = {r["stage"]: r for r in result["table"]}
        for name, row in rows.items():
            entry = stages.setdefault(name, {"stage": name, "kind": row["kind"], "from": row["from"], "metric": [],
                                             "delta": [], "kl": []})
            value = row.get("preference_accuracy") if row["kind"] == "rm" else gold(row)
            parent = gold(rows[row["from"]]) if row["kind"] not in ("rm", "-") and row["from"] in rows else None
            entry["metric"].append(value)
            entry["delta"].append(None if value is None or parent is None else value - parent)
            entry["kl"].append(row.get("kl"))
    return {"seeds": [r["seed"] for r in results], "wall_s": [r["wall_s"] for r in results],
            "stages": [s for s in stages.values() if any(v is not None for v in s["metric"])]}


def format_summary(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    head = ["stage", "from"] + [f"seed {s}" for s in seeds] + ["mean (min–max)", "vs parent", "KL to parent"]
    cells = [head]
    for s in summary["stages"]:
        values = _pct(s["metric"])
        label = s["stage"] + (" (pref. acc)" if s["kind"] == "rm" else "")
        cells.append([label, s["from"]] + ["-" if v is None else f"{v:.1f}" for v in values]
                     + [_spread(values), _spread(_pct(s["delta"])) if any(d is not None for d in s["delta"]) else "-",
                        _spread(s["kl"], 3) if any(k is not None for k in s["kl"]) and s["kind"] != "-" else "-"])
    cells.append(["wall (s)", "-"] + [f"{w:.0f}" for w in summary["wall_s"]] + [_spread(summary["wall_s"], 0), "-", "-"])
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"), help="Pipeline file to run.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="Base and pipeline seeds.")
    parser.add_argument("--out", default="runs/seeds", help="Directory for the bases and the pipelines.")
    parser.add_argument("--smoke", action="store_true", help="A few steps on one seed: checks that every stage runs.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own). On a 2-core machine shared with other busy "
                             "processes, 1 thread ran the demo's sft steps in 0.25-1 s instead of 1.2-4.4 s with 2 (measured 2026-12-01).")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    seeds = args.seeds[:1] if args.smoke else args.seeds
    out = Path(args.out)
    results = []
    for seed in seeds:
        results.append(run_seed(recipe, seed, out, args.smoke))
        print(f"seed {seed}: {results[-1]['status']} in {results[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    summary = summarize(results)
    summary["recipe"] = args.recipe
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({**summary, "runs": results}, indent=1) + "\n")
    print(format_summary(summary))
    return 0 if all(r["status"] == "completed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
