"""GRPO step time with and without `--async` (align.stages.async_rollout) on the tiny model, hf backend, CPU.

    python bench/async_grpo.py              # ~4 minutes on a quiet 2-core CPU
    python bench/async_grpo.py --smoke      # 3 steps per side, one round, no JSON

Everything is built in a temp dir: the tiny Qwen2 of `align tiny-model` (random weights) and a fresh LoRA (align's
defaults). Each side is one `align grpo` process on the bundled "arith-prompts" sample, `--reward closeness`,
`--num-generations 4 --batch-size 16 --max-completion-length 32 --backend hf --beta 0.04 --seed 0`, with
OMP_NUM_THREADS=1 (torch on one thread per Python thread, as the project runs experiments on its shared machine):
- sync:  plain `align grpo` — each step samples its batch with the live model, then trains on it.
- async: `--async --max-staleness K` — the next K batches are sampled in a background thread from a snapshot while
  the current one trains; the background thread is a second thread of the same process, so async can use a second
  core where sync uses one.
`--repeats` rounds alternate which side runs first; reported per side (medians over rounds): wall seconds per step
(`train_runtime` / steps, the Trainer's own clock: sampling, scoring, training, waiting), TRL's median `step_time` of
steps 2.. (the training step including the rollout or the wait for it), the mean `async/wait_s` and the staleness.
Results: bench/results/async_grpo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke_flag, offline, smoke_check, smoke_mode, table, wait_quiet, write_results  # noqa: E402

COMMON = ["--data", "arith-prompts", "--reward", "closeness", "--num-generations", "4", "--batch-size", "16",
          "--max-completion-length", "32", "--backend", "hf", "--beta", "0.04", "--seed", "0", "--logging-steps", "1",
          "--no-tensorboard", "--save-steps", "100000"]


def run_side(model: str, out: Path, steps: int, extra: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "align", "grpo", "--model", model, "--output", str(out), "--max-steps", str(steps),
           *COMMON, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    summary = next(r for r in rows if "train_runtime" in r)
    result = {"steps": len(logged), "s_per_step": summary["train_runtime"] / len(logged),
              "median_step_time_s": statistics.median(r["step_time"] for r in logged[1:]) if len(logged) > 1 else None}
    if "async/wait_s" in logged[0]:
        result.update(mean_wait_s=statistics.fmean(r["async/wait_s"] for r in logged[1:]),
                      staleness=[r["async/staleness_max"] for r in logged])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds, alternating which side goes first (default 2)")
    parser.add_argument("--max-staleness", type=int, default=1, help="K of the async side (default 1)")
    add_smoke_flag(parser, "3 steps per side, one round")
    args = parser.parse_args()
    smoke = smoke_mode(args.smoke)
    steps, repeats = (3, 1) if smoke else (args.steps, args.repeats)
    offline()
    sides = {"sync": [], "async": ["--async", "--max-staleness", str(args.max_staleness)]}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="align-bench-async-") as tmp:
        model = str(Path(tmp) / "tiny")
        subprocess.run([sys.executable, "-m", "align", "tiny-model", "--output", model], check=True,
                       capture_output=True)
        for r in range(repeats):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                wait_quiet()
                results[name].append(run_side(model, Path(tmp) / f"{name}-{r}", steps, sides[name]))
    med = {name: {key: statistics.median(x[key] for x in runs) for key in ("s_per_step", "median_step_time_s")}
           for name, runs in results.items()}
    rows = [[name, med[name]["s_per_step"], med[name]["median_step_time_s"],
             statistics.median(x.get("mean_wait_s", 0.0) for x in results[name])] for name in sides]
    print(table(["side", "s/step (train_runtime)", "median step_time s", "mean wait s"], rows))
    if smoke:
        async_run = results["async"][0]
        smoke_check("async_grpo", {
            "sync side logged every step": results["sync"][0]["steps"] == steps,
            "async side logged every step": async_run["steps"] == steps,
            "async batches at most K steps old": max(async_run["staleness"]) <= args.max_staleness,
            "async side sampled ahead (staleness K after the first step)":
                async_run["staleness"][1:] == [args.max_staleness] * (steps - 1),
        })
        return
    speedup = med["sync"]["s_per_step"] / med["async"]["s_per_step"]
    print(f"async speed-up (sync s/step / async s/step): {speedup:.2f}x")
    path = write_results("async_grpo", {"command": " ".join(["python", "bench/async_grpo.py", *sys.argv[1:]]),
                                        "settings": COMMON, "steps": steps, "repeats": repeats,
                                        "max_staleness": args.max_staleness, "runs": results, "median": med,
                                        "speedup": speedup})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
