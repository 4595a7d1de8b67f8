"""PPO: `align ppo` vs TRL 0.13's PPOTrainer (the last TRL with PPO; 1.16 has none) — step time and peak RSS on
the same model, reward model, prompts and PPO settings.

    python bench/ppo_vs_trl.py                       # tiny and medium model (~30 min on a quiet 2-core CPU)
    python bench/ppo_vs_trl.py --size tiny --rounds 1 --steps 3     # a quick run of the tiny size
    python bench/ppo_vs_trl.py --size medium         # one size; replaces that size in the results JSON
    python bench/ppo_vs_trl.py --setup               # only create bench/.venv-trl013 (.ci/run does, at install time)
    python bench/ppo_vs_trl.py --smoke               # a smaller model, 3 steps of 4 completions, every side, no JSON

The first run (or `--setup`) creates bench/.venv-trl013 (torch 2.13.0, trl 0.13.0, transformers 4.47.1, peft 0.14.0:
TRL 0.13 needs transformers 4.x, which cannot share align's venv; a pip install from PyPI) and runs TRL there, in its
own processes. `--smoke` never installs: without that venv it runs the align side alone and says so.

Setup (per model size, all built in a temp dir): `align tiny-model` (a random Qwen2 + BPE tokenizer) → `align sft`
(3 steps: barely trained, so completions run to the length limit on both sides) → `align rm --from` it → `align
merge` of both, so TRL gets the same weights as plain directories: the merged SFT model (policy; reference = a
second copy) and the merged reward model as an AutoModelForSequenceClassification (reward model; value model = a
second copy, as TRL's example script initialises it). Prompts: the bundled `arith-prompts`, rendered with the chat
template by align and handed to TRL as token ids.

Sides, each run in a fresh process (peak RSS = the process's own ru_maxrss from `os.wait4`):
- align: `align ppo --from SFT --reward-model RM` with align's defaults for the job — a LoRA actor on the merged
  base (reference = adapters off), critic = a second adapter on the same base initialised from the rm, reward
  model = the rm's frozen adapter on that base (one copy of the base weights), hf rollouts.
- trl: TRL 0.13 PPOTrainer as its examples/scripts/ppo/ppo.py sets it up: four full models, full fine-tuning of
  policy and value model.
- trl-lora: the same with `peft_config` (LoRA r 16, α 32, all-linear, like align's): the reference becomes the
  policy with its adapter disabled; value and reward model stay full, the value model is fully trained.

Same on every side: PPO steps, completions per step (`--batch-size`), completion length (TRL's response_length,
stop token = EOS), PPO epochs, minibatches (one optimizer step each, no gradient accumulation), temperature 1, kl
coef 0.05, clip ranges 0.2/0.2, vf coef 0.1, γ 1, λ 0.95, no reward whitening, no EOS penalty, lr 1e-5 linear
decay, AdamW without weight decay, no gradient clipping (TRL 0.13's PPO loop never clips, so align runs with
`--max-grad-norm 0`), seed 0, fp32, dropout off. Differences that remain are listed in the results (DIFFERENCES).

Step time: wall time from the end of one PPO step to the end of the next (align: `PPO.train_step` returning;
TRL: `on_step_end`), medians over the steps after `--warmup`, pooled over `--rounds` rounds in which the sides
alternate order. Each run starts after a quiet period (bench/_common.py `wait_quiet`); the CPU time other
processes used during every step is recorded, and medians are also given over the "clean" steps only (foreign
load ≤ `--max-foreign` cores). Every side runs with `--threads` torch threads (default 1: on a shared 2-core
machine a second busy process makes torch's two OpenMP threads wait on each other and a 5 s step takes a minute;
one thread per process degrades gracefully, and both sides get the same). Results: bench/results/ppo_vs_trl.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import functools
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
    BENCH_DIR,
    RESULTS_DIR,
    add_smoke_flag,
    align_steps,
    cpu_seconds,
    finite,
    offline,
    smoke_check,
    smoke_mode,
    wait_quiet,
    write_results,
)

TRL_VENV = BENCH_DIR / ".venv-trl013"
TRL_PINS = ["torch==2.13.0", "trl==0.13.0", "transformers==4.47.1", "peft==0.14.0"]
TRL_DRIVER = BENCH_DIR / "_trl013_ppo.py"
SIDES = ("align", "trl", "trl-lora")

# model and per-size defaults (steps, batch, completion length) chosen so a step takes seconds, not minutes
SIZES = {
    "tiny": {"model": dict(hidden_size=256, num_layers=4, num_heads=4), "rm_steps": 40,
             "steps": 8, "batch_size": 64, "completion_length": 32},
    "medium": {"model": dict(hidden_size=1024, num_layers=8, num_heads=16), "rm_steps": 5,
               "steps": 3, "batch_size": 8, "completion_length": 16},
}
# --smoke: align.tiny's default shape (hidden 128, 2 layers, 2 heads), 3 steps (1 warm-up + 2 measured)
SMOKE_SIZE = {"model": dict(hidden_size=128, num_layers=2, num_heads=2), "rm_steps": 2,
              "steps": 3, "batch_size": 4, "completion_length": 8}

DIFFERENCES = [
    "π_old: align recomputes the actor's log-probs with a forward pass after sampling; TRL takes them from the "
    "generation logits (align does one more no-grad forward of the actor per step).",
    "Sampling: align's hf rollouts use transformers' default top_k=50 (align passes only temperature/top_p); TRL "
    "sets top_k=0. align stops generating once every row has emitted EOS; TRL always generates response_length "
    "tokens and truncates after EOS (with a barely trained policy few rows stop early: see completion lengths).",
    "No-grad forwards after sampling: align runs them in num_minibatches chunks of the batch; TRL in "
    "local_rollout_forward_batch_size (= the batch here) chunks.",
    "Training forward: TRL runs policy and value model in one wrapper forward and backpropagates their summed loss "
    "once; align backpropagates the actor's and the critic's loss one after the other (same gradients).",
    "LR schedule: align decays per optimizer step (minibatch), TRL per PPO step (same peak lr, linear).",
    "Score position: TRL adds the score one token after the last completion token when it fits (its "
    "sequence_lengths_p1); align on the last completion token. No cost difference.",
    "Library versions: TRL runs on transformers 4.47.1 (TRL 0.13 does not import with transformers 5), align on "
    "transformers 5.19; both on torch 2.13.0+cpu, same attention kernel default (sdpa).",
]


# -- setup ---------------------------------------------------------------------------------------------------------
def trl_installed() -> bool:
    """Whether the TRL 0.13 venv exists with every pinned package installed (files only: nothing is imported)."""
    site = list(TRL_VENV.glob("lib/python*/site-packages"))
    return (TRL_VENV / "bin" / "python").is_file() and len(site) == 1 and all(
        any(site[0].glob(f"{pin.replace('==', '-')}*.dist-info")) for pin in TRL_PINS)


@functools.cache
def trl_python() -> Path:
    """Python of the TRL 0.13 venv, created and installed (from PyPI) unless `trl_installed()`."""
    python = TRL_VENV / "bin" / "python"
    if trl_installed():
        return python
    check = [str(python), "-c", "import trl, peft; assert trl.__version__ == '0.13.0'"]
    print(f"creating {TRL_VENV} ({' '.join(TRL_PINS)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(TRL_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TRL_PINS[0]], check=True)  # torch first: the pinned CPU build, never a CUDA one
    subprocess.run([*pip, *TRL_PINS], check=True)
    subprocess.run(check, check=True)
    return python


def align_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "align", *map(str, args)]


def prepare(work: Path, size: dict) -> dict[str, Path]:
    """tiny model → sft (3 steps) → rm → merged copies for TRL (in one child process: this one stays small, since
    a child's peak RSS starts at its parent's RSS), and the rendered prompts."""
    from transformers import AutoTokenizer

    from align.data.prompts import load_prompts
    from align.stages.rollout import render_prompts

    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    common = ["--no-tensorboard", "--logging-steps", "10"]
    shape = [f"--{key.replace('_', '-')}={value}" for key, value in size["model"].items()]
    align_steps(["tiny-model", "-o", model, "--vocab-size", 1024, *shape],
                ["sft", "--model", model, "--data", "arith", "--output", work / "sft", "--max-steps", 3, "--lr",
                 "3e-3", "--batch-size", 16, "--no-packing", *common],
                ["rm", "--from", work / "sft", "--data", "arith-prefs", "--output", work / "rm", "--max-steps",
                 size["rm_steps"], "--lr", "1e-3", "--batch-size", 16, *common],
                ["merge", work / "sft", "--output", work / "sft-merged"],
                ["merge", work / "rm", "--output", work / "rm-merged"])
    rows, _ = load_prompts("arith-prompts")
    tokenizer = AutoTokenizer.from_pretrained(work / "sft-merged")
    (work / "prompts.json").write_text(json.dumps(render_prompts(tokenizer, [r["prompt"] for r in rows])))
    return {"model": model, "sft": work / "sft", "rm": work / "rm", "sft_merged": work / "sft-merged",
            "rm_merged": work / "rm-merged", "prompts": work / "prompts.json"}


# -- one run of one side ---------------------------------------------------------------------------------------------
def side_cmd(side: str, paths: dict, cfg: dict, out: Path, run_dir: Path) -> list[str]:
    if side == "align":
        return [sys.executable, __file__, "--align-worker", str(out), "--",
                "ppo", "--from", str(paths["sft"]), "--reward-model", str(paths["rm"]), "--data", "arith-prompts",
                "--output", str(run_dir), "--max-steps", str(cfg["steps"]), "--batch-size", str(cfg["batch_size"]),
                "--max-completion-length", str(cfg["completion_length"]), "--ppo-epochs", str(cfg["ppo_epochs"]),
                "--num-minibatches", str(cfg["num_minibatches"]), "--kl-coef", "0.05", "--temperature", "1.0",
                "--lr", "1e-5", "--lr-scheduler", "linear", "--max-grad-norm", "0", "--backend", "hf",
                "--seed", "0", "--save-steps", "100000", "--no-tensorboard"]
    return [str(trl_python()), str(TRL_DRIVER), "--policy", str(paths["sft_merged"]),
            "--reward-model", str(paths["rm_merged"]), "--prompts", str(paths["prompts"]), "--out", str(out),
            "--steps", str(cfg["steps"]), "--batch-size", str(cfg["batch_size"]),
            "--response-length", str(cfg["completion_length"]), "--ppo-epochs", str(cfg["ppo_epochs"]),
            "--num-minibatches", str(cfg["num_minibatches"]), "--kl-coef", "0.05", "--temperature", "1.0",
            "--lr", "1e-5", "--seed", "0", *(["--lora"] if side == "trl-lora" else [])]


def measure(cmd: list[str], threads: int = 0) -> dict:
    """Run `cmd` to completion: its peak RSS (MiB), wall time and the CPU other processes used meanwhile."""
    with tempfile.TemporaryFile("w+") as err:
        busy0, _ = cpu_seconds()
        t0 = time.perf_counter()
        env = {**os.environ, "TQDM_DISABLE": "1"}
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy1, _ = cpu_seconds()
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
    own = usage.ru_utime + usage.ru_stime
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall, "cpu_s": own,
            "foreign_cpu": max(0.0, busy1 - busy0 - own) / wall}


def step_records(record: dict) -> list[dict]:
    """Per-step wall time and foreign load from the worker's end timestamps and CPU samples."""
    ends, cpus = [record["begin"], *record["end"]], [record["cpu_begin"], *record["cpu"]]
    out = []
    for i in range(1, len(ends)):
        dt = ends[i] - ends[i - 1]
        (b0, o0), (b1, o1) = cpus[i - 1], cpus[i]
        out.append({"s": dt, "foreign": max(0.0, (b1 - b0) - (o1 - o0)) / dt})
    return out


def run_side(side: str, paths: dict, cfg: dict, work: Path, round_: int, args) -> dict:
    out, run_dir = work / f"{side}-{round_}.json", work / f"ppo-{side}-{round_}"
    waited = wait_quiet(timeout=args.quiet_timeout)
    result = measure(side_cmd(side, paths, cfg, out, run_dir), args.threads)
    record = json.loads(out.read_text())
    result.update(waited_s=waited, steps=step_records(record), generation_s=record["generation_s"],
                  completion_length=record["completion_length"], skipped=record.get("skipped", 0),
                  trainable_params=record.get("trainable_params"), versions=record.get("versions"))
    if side == "align":
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        result["phases"] = [{k.split("/")[1][:-2]: m[k] for k in m if k.startswith("timing/")} for m in metrics]
    return result


# -- align worker: align's own CLI, timed from outside through the metrics it logs -----------------------------------
def align_worker(out: Path, argv: list[str]) -> None:
    """Run `align ppo ARGV` (with --logging-steps 1) in this process while a thread watches RUN/metrics.jsonl: each new
    line is the end of a step, stamped with the wall clock and the CPU counters. The generation time and completion
    length of each step are ppo's own logged `timing/rollout_s` and `completions/mean_length`. Nothing of align is
    patched, so the bench cannot drift from the code it measures."""
    import threading

    import torch

    from align.cli import main

    metrics_path = Path(argv[argv.index("--output") + 1]) / "metrics.jsonl"
    record: dict = {"end": [], "cpu": [], "lines": []}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
            for line in lines[len(record["lines"]):]:
                if line.endswith("}"):
                    record["end"].append(time.perf_counter())
                    record["cpu"].append(cpu_seconds())
                    record["lines"].append(line)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = main([*argv, "--logging-steps", "1"])
    done.set()
    watcher.join()
    metrics = [json.loads(line) for line in record.pop("lines")]
    # the first step's end is the clock's start (step 1 holds warm-up and is left out of the medians anyway)
    record.update(begin=record["end"].pop(0), cpu_begin=record["cpu"].pop(0), skipped=1,
                  generation_s=[m["timing/rollout_s"] for m in metrics[1:]],
                  completion_length=[m["completions/mean_length"] for m in metrics[1:]],
                  versions={"torch": torch.__version__})
    out.write_text(json.dumps(record) + "\n")
    sys.exit(code)


# -- summary -------------------------------------------------------------------------------------------------------
def summarise(runs: list[dict], warmup: int, max_foreign: float) -> dict:
    """Medians over each run's steps after the first `warmup` (a run that starts at step 1 + `skipped` has already
    left those out)."""
    def after_warmup(run: dict, key: str) -> list:
        return run[key][max(0, warmup - run.get("skipped", 0)):]

    steps = [s for r in runs for s in after_warmup(r, "steps")]
    clean = [s["s"] for s in steps if s["foreign"] <= max_foreign]
    gen = [g for r in runs for g in after_warmup(r, "generation_s")]
    out = {
        "median_step_s": statistics.median(s["s"] for s in steps),
        "clean_steps": len(clean), "measured_steps": len(steps),
        "clean_median_step_s": statistics.median(clean) if clean else None,
        "median_generation_s": statistics.median(gen),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "peak_rss_mib_runs": [round(r["peak_rss_mib"]) for r in runs],
        "mean_foreign_cpu": statistics.fmean(s["foreign"] for s in steps),
        "completion_length": statistics.fmean(c for r in runs for c in r["completion_length"]),
    }
    if "phases" in runs[0]:
        phases = [p for r in runs for p in r["phases"][warmup:]]  # every step's, step 1 included
        out["median_phases_s"] = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    # the step time to compare: clean steps when there are enough of them, else all
    out["step_s"] = out["clean_median_step_s"] if len(clean) >= max(3, len(steps) // 2) else out["median_step_s"]
    return out


def baseline_rss(sides: list[str]) -> dict:
    """Peak RSS of a process that only imports the libraries of each side (the runtime floor of both)."""
    out = {"align": measure([sys.executable, "-c", "import align, torch, transformers, peft, trl"])["peak_rss_mib"]}
    if any(side != "align" for side in sides):
        trl_imports = [str(trl_python()), "-c", "import torch, transformers, peft, trl; from trl import PPOTrainer"]
        out["trl"] = measure(trl_imports)["peak_rss_mib"]
    return out


def bench_size(name: str, args, work: Path) -> dict:
    cfg = {**(SMOKE_SIZE if name == "smoke" else SIZES[name]), "ppo_epochs": args.ppo_epochs,
           "num_minibatches": args.num_minibatches}
    for key in ("steps", "batch_size", "completion_length"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    print(f"[{name}] preparing model, sft, rm ...", flush=True)
    paths = prepare(work / name, cfg)
    params = sum(f.stat().st_size for f in paths["model"].glob("*.safetensors")) / 4
    runs: dict[str, list] = {side: [] for side in args.sides}
    for round_ in range(args.rounds):
        order = list(args.sides) if round_ % 2 == 0 else list(reversed(args.sides))
        for side in order:
            result = run_side(side, paths, cfg, work / name, round_, args)
            runs[side].append(result)
            steps = [round(s["s"], 2) for s in result["steps"]]
            print(f"[{name}] round {round_} {side}: peak RSS {result['peak_rss_mib']:.0f} MiB, steps {steps} s, "
                  f"foreign load {result['foreign_cpu']:.2f} cores (waited {result['waited_s']:.0f} s)", flush=True)
    summary = {side: summarise(r, args.warmup, args.max_foreign) for side, r in runs.items()}
    ratios = {}
    if "align" in summary:
        for other in (s for s in summary if s != "align"):
            ratios[f"align/{other}"] = {
                "step_time": summary["align"]["step_s"] / summary[other]["step_s"],
                "peak_rss": summary["align"]["peak_rss_mib"] / summary[other]["peak_rss_mib"],
            }
    return {"model": cfg["model"], "threads": args.threads, "params_approx": params, "weights_mib": params * 4 / 2**20,
            "settings": {k: v for k, v in cfg.items() if k not in ("model", "rm_steps")},
            "summary": summary, "ratios": ratios, "runs": runs}


def markdown(name: str, r: dict, baseline: dict) -> str:
    s = r["settings"]
    lines = [f"**{name}**: Qwen2 hidden {r['model']['hidden_size']}, {r['model']['num_layers']} layers "
             f"(~{r['params_approx'] / 1e6:.1f} M params, {r['weights_mib']:.0f} MiB fp32); {s['steps']} PPO steps × "
             f"{s['batch_size']} completions of ≤ {s['completion_length']} tokens, {s['ppo_epochs']} PPO epochs × "
             f"{s['num_minibatches']} minibatches, {r['threads'] or 'default'} torch thread(s) per process",
             "",
             "| side | step s (median) | clean steps | generation s | completion tokens | peak RSS MiB | "
             "RSS above import baseline | foreign load |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for side, m in r["summary"].items():
        base = baseline["align" if side == "align" else "trl"]
        lines.append(f"| {side} | {m['step_s']:.2f} | {m['clean_steps']}/{m['measured_steps']} | "
                     f"{m['median_generation_s']:.2f} | {m['completion_length']:.1f} | {m['peak_rss_mib']:.0f} | "
                     f"{m['peak_rss_mib'] - base:.0f} | {m['mean_foreign_cpu']:.2f} |")
    for pair, q in r["ratios"].items():
        lines.append(f"| **{pair}** | **{q['step_time']:.2f}×** | | | | **{q['peak_rss']:.2f}×** | | |")
    return "\n".join(lines)


def smoke_checks(r: dict, args) -> dict[str, bool]:
    """Every side ran every round, each with a step time per measured step (align's first step is its clock's start),
    a generation time, completion lengths and a peak RSS."""
    steps = r["settings"]["steps"]
    checks = {}
    for side in args.sides:
        runs = r["runs"].get(side, [])
        checks[f"{side} side: {args.rounds} run(s) of >= {steps - 1} timed PPO steps with generation times, "
               "completion lengths and peak RSS"] = len(runs) == args.rounds and all(
            len(run["steps"]) >= steps - 1 and len(run["generation_s"]) >= steps - 1 and run["completion_length"]
            and finite(*(x["s"] for x in run["steps"]), *run["generation_s"], run["peak_rss_mib"]) for run in runs)
    checks["align side: phase timings logged"] = bool(r["runs"].get("align")) and all(
        run.get("phases") for run in r["runs"]["align"])
    return checks


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--align-worker":
        offline()
        return align_worker(Path(sys.argv[2]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=(*SIZES, "all"), default="all", help="model size(s) to run")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--rounds", type=int, default=2, help="runs per side (sides alternate order each round)")
    parser.add_argument("--steps", type=int, default=None, help="PPO steps per run (default per size)")
    parser.add_argument("--batch-size", type=int, default=None, help="completions per PPO step (default per size)")
    parser.add_argument("--completion-length", type=int, default=None, help="max completion tokens (default per size)")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--num-minibatches", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="leading steps of each run left out of the medians")
    parser.add_argument("--max-foreign", type=float, default=0.3, help="a 'clean' step: other processes used at "
                                                                        "most this many cores meanwhile")
    parser.add_argument("--quiet-timeout", type=float, default=60.0, help="max seconds to wait for a quiet machine "
                                                                           "before each run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every side's process (OMP_NUM_THREADS; "
                                                                 "0 = torch's default, one per core)")
    parser.add_argument("--work", type=Path, default=None, help="keep models and runs here (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    parser.add_argument("--setup", action="store_true", help=f"only create {TRL_VENV.relative_to(BENCH_DIR.parent)} "
                                                             "(pip install from PyPI) and exit")
    add_smoke_flag(parser, "hidden 128, 2 layers, 3 PPO steps of 4 completions of <= 8 tokens, 1 PPO epoch, one "
                           "round; every side, or the align side alone when the TRL venv is absent")
    args = parser.parse_args()
    if args.setup:
        print(f"TRL side ready: {trl_python()}")
        return
    offline()
    sizes = list(SIZES) if args.size == "all" else [args.size]
    if smoke_mode(args.smoke):
        sizes, args.rounds, args.ppo_epochs, args.warmup = ["smoke"], 1, 1, 1
        if not trl_installed():
            print(f"smoke: {TRL_VENV} is absent (created by `python bench/ppo_vs_trl.py --setup`): TRL sides "
                  "skipped, the align side runs alone", flush=True)
            args.sides = ["align"]
    if any(side != "align" for side in args.sides):
        trl_python()  # (installs nothing in a smoke: its TRL sides run only when the venv is there)
    results: dict = {"command": "python bench/ppo_vs_trl.py " + " ".join(sys.argv[1:]), "sizes": {},
                     "differences": DIFFERENCES}
    with tempfile.TemporaryDirectory(prefix="align-bench-ppo-trl-") as tmp:
        work = args.work or Path(tmp)
        results["baseline_rss_mib"] = baseline_rss(args.sides)
        for name in sizes:
            results["sizes"][name] = bench_size(name, args, work)
    trl_versions = next((r["versions"] for s in results["sizes"].values()
                         for side, runs in s["runs"].items() if side != "align" for r in runs), None)
    results["trl_env"] = trl_versions
    baseline = results["baseline_rss_mib"]
    if trl_versions:
        print(f"\nTRL side: trl {trl_versions['trl']}, transformers {trl_versions['transformers']}, torch "
              f"{trl_versions['torch']}; import baseline RSS: align {baseline['align']:.0f} MiB, "
              f"TRL {baseline['trl']:.0f} MiB\n")
    for name, r in results["sizes"].items():
        print(markdown(name, r, baseline) + "\n")
    if args.smoke:
        return smoke_check("ppo_vs_trl", smoke_checks(results["sizes"]["smoke"], args))
    if not args.no_write:
        previous = RESULTS_DIR / "ppo_vs_trl.json"
        if previous.is_file():  # sizes not re-measured this time: keep them from the last run
            old = json.loads(previous.read_text())
            results["sizes"] = {**old.get("sizes", {}), **results["sizes"]}
        print(f"results: {write_results('ppo_vs_trl', results)}")


if __name__ == "__main__":
    main()
