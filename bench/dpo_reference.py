"""What the DPO reference model costs in `align dpo`: memory of align's adapter-copy reference vs a separate
reference model, and step time with and without precomputed reference log-probs.

    python bench/dpo_reference.py            # ~6-7 minutes on a 2-core CPU, offline
    python bench/dpo_reference.py --quick    # tiny sizes, ~1 minute: checks that the script runs

Part 1 — peak memory (max RSS). A random-weight tiny Qwen2 large enough that its fp32 weights dominate the
process (align.tiny.build_tiny_model, hidden 2048, 12 layers, 16 heads, ~0.5 B params, ~2 GB), LoRA DPO for a
few steps, each variant in its own fresh subprocess (so peaks do not mix; peak = getrusage ru_maxrss):
  (a) align: `align.stages.dpo.main(DPOConfig...)`: a PeftModel with a fresh LoRA adapter and `ref_model=None`,
      so TRL copies the trainable "default" adapter into a frozen "ref" adapter of the same model;
  (b) separate reference: the same policy (align.handoff.build_policy, same seed, same LoRA) and the same TRL
      DPOConfig (align.stages.common.trainer_arguments + the DPO fields main() sets), but the base model loaded
      a second time with AutoModelForCausalLM (frozen, eval) and passed as `ref_model=` to TRL's DPOTrainer
      directly. The policy's adapter is fresh (B = 0), so the bare base is exactly its reference.
Both do the same steps on the same data (bundled `arith-prefs`, align/data/samples/arith_prefs.jsonl, via
align.data.preference.load_preferences -> datasets.Dataset.from_list), same seed and batch size; the per-step
losses of both are recorded to show they did the same work. RSS is also sampled after imports + data, and after
each model load, to show the weights' share. Goal (issue): peak(a) / peak(b) <= 0.6.

Part 2 — step time of `align dpo` with `precompute_ref_log_probs` False vs True, on a mid-sized tiny model
(hidden 512, 4 layers; a step is a few hundred ms here), same steps/data/seed/batch size, each run in a fresh
subprocess, interleaved A B / B A over `--rounds` rounds. Step time = on_step_begin -> on_step_end of TRL's
Trainer (forward, backward, optimizer), median over the steps after `--warmup`. The one-off precompute cost is
timed separately: TRL's hash of the model weights (the cache key) plus the reference forward pass over the
*whole* training set (TRL precomputes every example, whatever --max-steps is). "Total" = wall time from the
start of DPOTrainer construction to the end of the last step, i.e. tokenization + precompute (if on) + all
steps. Before each timed run the script waits (up to 60 s) for the machine to be quiet and records how much CPU
other processes took meanwhile (`foreign_cpu`, in cores): on this 2-core machine another busy process slows
steps several-fold.

Results: bench/results/dpo_reference.json and a table on stdout. Everything is local (no hub, no network).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_seconds, machine, offline, table, wait_quiet, write_results  # noqa: E402

GOAL = 0.6
BIG = dict(hidden_size=2048, num_layers=12, num_heads=16)
MID = dict(hidden_size=512, num_layers=4, num_heads=8)
QUICK_BIG = dict(hidden_size=256, num_layers=2, num_heads=4)
QUICK_MID = dict(hidden_size=128, num_layers=2, num_heads=2)


# -- memory helpers (worker side) -------------------------------------------------------------------------------
def rss() -> dict:
    """Current RSS of this process (and its anonymous / file-backed parts), and the peak so far, in MiB."""
    import resource

    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"rss_mib": out["VmRSS"], "anon_mib": out.get("RssAnon"), "file_mib": out.get("RssFile"),
            "peak_mib": out["ru_maxrss"]}


class Timer:
    """Per-step timestamps (TrainerCallback) and machine / own CPU seconds, for one run."""

    def __init__(self):
        self.begin: list[float] = []
        self.end: list[float] = []
        self.cpu: list[tuple[float, float]] = []
        self.events: dict[str, float] = {}

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _StepTimer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.events["train_begin"] = time.perf_counter()
                timer.cpu.append(cpu_seconds())

            def on_step_begin(self, args, state, control, **kwargs):
                timer.begin.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                timer.end.append(time.perf_counter())
                timer.cpu.append(cpu_seconds())

        return _StepTimer()


def _losses(log_history) -> list[float]:
    return [round(float(m["loss"]), 6) for m in log_history if "loss" in m]


def _dpo_config(spec: dict, output: Path, precompute: bool = False):
    from align.stages.dpo import DPOConfig

    return DPOConfig.from_kwargs(
        model=spec["model"], data="arith-prefs", output=str(output), max_steps=spec["steps"],
        batch_size=spec["batch_size"], seed=spec["seed"], precompute_ref_log_probs=precompute, tensorboard=False,
        logging_steps=1, save_steps=10_000,
    )


def worker_memory_align(spec: dict) -> dict:
    """(a) align's path: ref_model=None on a PeftModel -> frozen "ref" adapter copy."""
    import align.handoff
    from align.stages.dpo import main

    timer, marks = Timer(), {}
    original = align.handoff.build_policy

    def build_policy(*a, **k):
        marks["before_model"] = rss()
        policy = original(*a, **k)
        marks["after_model"] = rss()
        return policy

    align.handoff.build_policy = build_policy
    import align.stages.dpo as dpo

    original_callbacks = dpo.callbacks
    dpo.callbacks = lambda run, tb: [*original_callbacks(run, tb), timer.callback()]
    run_dir = main(_dpo_config(spec, Path(spec["work"]) / "run-a"))
    marks["end"] = rss()
    metrics = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return {"rss": marks, "losses": _losses(metrics), "steps": len(timer.end), "step_s": _step_times(timer)}


def worker_memory_separate(spec: dict) -> dict:
    """(b) the same policy and TRL config, plus a second copy of the base passed as ref_model= to DPOTrainer."""
    from types import SimpleNamespace

    import datasets as hf_datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from align.data.preference import load_preferences
    from align.handoff import build_policy
    from align.stages.common import seed_everything, trainer_arguments

    timer, marks = Timer(), {}
    cfg = _dpo_config(spec, Path(spec["work"]) / "run-b")
    pairs, _ = load_preferences("arith-prefs")
    seed_everything(cfg.seed)
    marks["before_model"] = rss()
    policy = build_policy(cfg, stage="dpo")
    marks["after_model"] = rss()
    ref = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    ref.requires_grad_(False)
    ref.eval()
    marks["after_ref_model"] = rss()
    fake_run = SimpleNamespace(checkpoints_dir=Path(spec["work"]) / "run-b" / "checkpoints")
    args = TRLDPOConfig(
        **trainer_arguments(cfg, fake_run, False), max_length=cfg.max_length, beta=cfg.beta,
        loss_type=list(cfg.loss), loss_weights=cfg.loss_weights, label_smoothing=cfg.label_smoothing,
        precompute_ref_log_probs=False,
    )
    trainer = DPOTrainer(model=policy.model, ref_model=ref, args=args, processing_class=policy.tokenizer,
                         train_dataset=hf_datasets.Dataset.from_list(pairs), callbacks=[timer.callback()])
    assert "ref" not in policy.model.peft_config, "TRL added a ref adapter although ref_model was given"
    trainer.train()
    marks["end"] = rss()
    return {"rss": marks, "losses": _losses(trainer.state.log_history), "steps": len(timer.end),
            "step_s": _step_times(timer)}


def _step_times(timer: Timer) -> list[float]:
    return [e - b for b, e in zip(timer.begin, timer.end, strict=True)]


def worker_timing(spec: dict) -> dict:
    """`align dpo` with precompute_ref_log_probs on/off; times steps, the weight hash and the precompute pass."""
    import trl.trainer.dpo_trainer as dpo_trainer
    from trl import DPOTrainer

    import align.stages.dpo as dpo

    timer = Timer()
    spans: dict[str, list[float]] = {"hash": [], "precompute": []}

    def timed(fn, key):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spans[key].append(time.perf_counter() - t0)

        return wrapper

    dpo_trainer.hash_module = timed(dpo_trainer.hash_module, "hash")
    DPOTrainer._precompute_ref_logps = timed(DPOTrainer._precompute_ref_logps, "precompute")
    original_init = DPOTrainer.__init__

    def init(self, *a, **k):
        timer.events.setdefault("trainer_init", time.perf_counter())
        original_init(self, *a, **k)
        timer.events["trainer_ready"] = time.perf_counter()

    DPOTrainer.__init__ = init
    original_callbacks = dpo.callbacks
    dpo.callbacks = lambda run, tb: [*original_callbacks(run, tb), timer.callback()]
    precompute = spec["precompute"]
    run_dir = dpo.main(_dpo_config(spec, Path(spec["work"]) / f"run-{int(precompute)}-{spec['round']}", precompute))
    metrics = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    steps = _step_times(timer)
    warm = spec["warmup"]
    (busy0, own0), (busy1, own1) = timer.cpu[0], timer.cpu[-1]
    span = timer.end[-1] - timer.events["train_begin"]
    return {
        "precompute": precompute,
        "steps": len(steps),
        "median_step_s": statistics.median(steps[warm:]),
        "step_s": steps,
        "hash_s": sum(spans["hash"]),
        "precompute_pass_s": sum(spans["precompute"]),
        "trainer_init_s": timer.events["trainer_ready"] - timer.events["trainer_init"],
        "total_s": timer.end[-1] - timer.events["trainer_init"],
        "steps_total_s": timer.end[-1] - timer.events["train_begin"],
        "foreign_cpu": max(0.0, (busy1 - busy0) - (own1 - own0)) / span,
        "losses": _losses(metrics),
        "peak_rss_mib": rss()["peak_mib"],
    }


def worker_build(spec: dict) -> dict:
    from align.tiny import build_tiny_model

    build_tiny_model(spec["path"], vocab_size=1024, **spec["size"])
    from safetensors import safe_open

    params = 0
    for file in Path(spec["path"]).glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            for name in fh.keys():
                shape = fh.get_slice(name).get_shape()
                params += math.prod(shape)
    return {"params": params, "fp32_mib": params * 4 / 2**20}


WORKERS = {"build": worker_build, "memory_align": worker_memory_align, "memory_separate": worker_memory_separate,
           "timing": worker_timing}


# -- driver ----------------------------------------------------------------------------------------------------
def other_benchmarks() -> list[str]:
    """Command lines of other running `bench/` scripts (they share the 2 cores)."""
    mine = {os.getpid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if "bench/" in cmd and "dpo_reference" not in cmd:
            found.append(cmd)
    return found


def spawn(kind: str, spec: dict, work: Path) -> dict:
    spec_path = work / f"spec-{kind}-{time.monotonic_ns()}.json"
    out_path = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps({**spec, "work": str(work)}))
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, str(spec_path), str(out_path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"worker {kind} failed (exit {proc.returncode})")
    return json.loads(out_path.read_text())


def memory_part(args, work: Path, log) -> dict:
    size = QUICK_BIG if args.quick else BIG
    path = work / "big"
    t0 = time.perf_counter()
    info = spawn("build", {"path": str(path), "size": size}, work)
    log(f"built {size} ({info['params'] / 1e6:.0f} M params, {info['fp32_mib']:.0f} MiB fp32) "
        f"in {time.perf_counter() - t0:.0f} s")
    spec = {"model": str(path), "steps": args.mem_steps, "batch_size": args.batch_size, "seed": args.seed}
    others = other_benchmarks()
    runs = {}
    for name, kind in (("a_align_adapter_ref", "memory_align"), ("b_separate_ref_model", "memory_separate")):
        t0 = time.perf_counter()
        runs[name] = spawn(kind, spec, work)
        runs[name]["wall_s"] = time.perf_counter() - t0
        log(f"memory {name}: peak {runs[name]['rss']['end']['peak_mib']:.0f} MiB in {runs[name]['wall_s']:.0f} s")
    peak_a = runs["a_align_adapter_ref"]["rss"]["end"]["peak_mib"]
    peak_b = runs["b_separate_ref_model"]["rss"]["end"]["peak_mib"]
    same = runs["a_align_adapter_ref"]["losses"] == runs["b_separate_ref_model"]["losses"]
    close = all(abs(x - y) < 1e-4 for x, y in zip(runs["a_align_adapter_ref"]["losses"],
                                                  runs["b_separate_ref_model"]["losses"], strict=True))
    return {"model": {**size, "vocab_size": 1024, **info}, "steps": args.mem_steps, "batch_size": args.batch_size,
            "runs": runs, "ratio_a_over_b": peak_a / peak_b, "goal": GOAL, "goal_met": peak_a / peak_b <= GOAL,
            "losses_identical": same, "losses_within_1e-4": close, "other_benchmarks_seen": others}


def timing_part(args, work: Path, log) -> dict:
    size = QUICK_MID if args.quick else MID
    path = work / "mid"
    info = spawn("build", {"path": str(path), "size": size}, work)
    spec = {"model": str(path), "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
            "warmup": args.warmup}
    runs: dict[str, list] = {"off": [], "on": []}
    others, waited = set(), []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for precompute in order:
            others.update(other_benchmarks())
            waited.append(wait_quiet(timeout=60.0))
            res = spawn("timing", {**spec, "precompute": precompute, "round": r}, work)
            runs["on" if precompute else "off"].append(res)
            log(f"round {r} precompute={precompute}: median step {res['median_step_s'] * 1000:.0f} ms, "
                f"precompute pass {res['precompute_pass_s']:.1f} s, total {res['total_s']:.1f} s, "
                f"foreign cpu {res['foreign_cpu']:.2f}")
    summary = {}
    for key, rs in runs.items():
        summary[key] = {name: statistics.median(r[name] for r in rs) for name in
                        ("median_step_s", "hash_s", "precompute_pass_s", "trainer_init_s", "total_s", "steps_total_s",
                         "foreign_cpu")}
    saved = summary["off"]["median_step_s"] - summary["on"]["median_step_s"]
    one_off = summary["on"]["hash_s"] + summary["on"]["precompute_pass_s"]
    return {"model": {**size, "vocab_size": 1024, **info}, "steps": args.steps, "warmup": args.warmup,
            "batch_size": args.batch_size, "rounds": args.rounds, "runs": runs, "median": summary,
            "step_speedup_off_over_on": summary["off"]["median_step_s"] / summary["on"]["median_step_s"],
            "saved_per_step_s": saved, "one_off_precompute_s": one_off,
            "break_even_steps": one_off / saved if saved > 0 else None,
            "losses_identical": [r["losses"] for r in runs["off"]][0] == [r["losses"] for r in runs["on"]][0],
            "waited_for_quiet_s": waited, "other_benchmarks_seen": sorted(others)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (smoke test)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    offline()
    if args.worker:
        kind, spec_path, out_path = args.worker
        result = WORKERS[kind](json.loads(Path(spec_path).read_text()))
        Path(out_path).write_text(json.dumps(result))
        return
    if args.quick:
        args.steps, args.rounds, args.mem_steps = 6, 1, 2

    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-dpo-ref-") as tmp:
        work = Path(tmp)
        memory = memory_part(args, work, log)
        timing = timing_part(args, work, log)

    a, b = memory["runs"]["a_align_adapter_ref"]["rss"], memory["runs"]["b_separate_ref_model"]["rss"]
    print("\nPeak RSS, LoRA DPO, "
          f"{memory['model']['params'] / 1e6:.0f} M-param model ({memory['model']['fp32_mib']:.0f} MiB fp32), "
          f"{memory['steps']} steps, batch {memory['batch_size']}:")
    print(table(["variant", "before model MiB", "after model(s) MiB", "peak MiB"], [
        ["(a) align: ref adapter copy", a["before_model"]["rss_mib"], a["after_model"]["rss_mib"], a["end"]["peak_mib"]],
        ["(b) separate ref model", b["before_model"]["rss_mib"], b["after_ref_model"]["rss_mib"], b["end"]["peak_mib"]],
    ]))
    print(f"(a)/(b) = {memory['ratio_a_over_b']:.3f} (goal <= {GOAL}: {'met' if memory['goal_met'] else 'NOT met'}); "
          f"same losses: {memory['losses_identical']} (within 1e-4: {memory['losses_within_1e-4']})")
    m = timing["median"]
    print(f"\nalign dpo step time, {timing['model']['params'] / 1e6:.1f} M-param model, {timing['steps']} steps, "
          f"batch {timing['batch_size']}, {timing['rounds']} rounds (medians):")
    print(table(["precompute_ref_log_probs", "step ms", "hash s", "precompute pass s", "total s", "foreign cpu"], [
        [name, 1000 * m[key]["median_step_s"], m[key]["hash_s"], m[key]["precompute_pass_s"], m[key]["total_s"],
         m[key]["foreign_cpu"]] for name, key in (("False", "off"), ("True", "on"))
    ]))
    be = timing["break_even_steps"]
    print(f"step time off/on = {timing['step_speedup_off_over_on']:.2f}x; one-off precompute "
          f"{timing['one_off_precompute_s']:.1f} s; break-even after "
          f"{'never' if be is None else f'{be:.0f}'} steps")
    if not args.quick:
        path = write_results("dpo_reference", {"command": "python bench/dpo_reference.py", "memory": memory,
                                               "timing": timing, "wall_s": time.perf_counter() - started})
        print(f"\nwrote {path}")
    log("done")


if __name__ == "__main__":
    main()
