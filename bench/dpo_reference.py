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
steps. Before each timed run the script waits (up to 30 s, --quiet-timeout) for the machine to be quiet and records how much CPU
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


def _step_times(timer: Timer) -> list[float]:
    return [e - b for b, e in zip(timer.begin, timer.end, strict=True)]


def instrument_dpo_trainer(timer: Timer, marks: dict) -> dict:
    """Hook TRL's DPOTrainer (not align's internals): RSS when it is constructed (models loaded), its args, the
    time of its construction, the weight hash and the precompute pass, and a step-timing callback."""
    import trl.trainer.dpo_trainer as dpo_trainer
    from trl import DPOTrainer

    seen: dict = {"hash": [], "precompute": []}

    def timed(fn, key):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seen[key].append(time.perf_counter() - t0)

        return wrapper

    dpo_trainer.hash_module = timed(dpo_trainer.hash_module, "hash")
    DPOTrainer._precompute_ref_logps = timed(DPOTrainer._precompute_ref_logps, "precompute")
    original_init = DPOTrainer.__init__

    def init(self, *a, **k):
        marks.setdefault("models_loaded", rss())
        timer.events.setdefault("trainer_init", time.perf_counter())
        original_init(self, *a, **k)
        timer.events["trainer_ready"] = time.perf_counter()
        self.add_callback(timer.callback())
        seen["trainer"] = self
        seen["ref_adapter"] = "ref" in getattr(self.model, "peft_config", {})
        seen["separate_ref_model"] = self.ref_model is not None

    DPOTrainer.__init__ = init
    return seen


def _args_dict(trainer) -> dict:
    ignore = ("output_dir", "logging_dir")
    return {k: repr(v) for k, v in trainer.args.to_dict().items() if k not in ignore}


def worker_memory_align(spec: dict) -> dict:
    """(a) align's path: `align dpo` (ref_model=None on a PeftModel -> frozen "ref" adapter copy)."""
    import datasets  # noqa: F401  (imported before the baseline RSS, like in (b))
    import peft  # noqa: F401

    from align.stages.dpo import DPOConfig, main

    timer, marks = Timer(), {}
    seen = instrument_dpo_trainer(timer, marks)
    marks["before_model"] = rss()  # after imports
    main(DPOConfig.from_kwargs(
        model=spec["model"], data="arith-prefs", output=str(Path(spec["work"]) / "run-a"), max_steps=spec["steps"],
        batch_size=spec["batch_size"], seed=spec["seed"], tensorboard=False, logging_steps=1, save_steps=10_000,
    ))
    marks["end"] = rss()
    trainer = seen["trainer"]
    return {"rss": marks, "losses": _losses(trainer.state.log_history), "steps": len(timer.end),
            "step_s": _step_times(timer), "ref_adapter": seen["ref_adapter"],
            "separate_ref_model": seen["separate_ref_model"], "args": _args_dict(trainer)}


def worker_memory_separate(spec: dict) -> dict:
    """(b) plain TRL + PEFT: the same LoRA policy and DPO settings as align's (a), plus a second copy of the base
    loaded with AutoModelForCausalLM and passed as ref_model= to DPOTrainer."""
    import datasets as hf_datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    import align.stages.dpo  # noqa: F401  (imported before the baseline RSS, like in (a))
    from align.data.preference import load_preferences

    timer, marks = Timer(), {}
    seen = instrument_dpo_trainer(timer, marks)
    marks["before_model"] = rss()  # after imports
    pairs, _ = load_preferences("arith-prefs")
    set_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    # align's LoRA defaults: r 16, alpha 32, dropout 0.05, all-linear
    policy = get_peft_model(policy, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                               task_type="CAUSAL_LM"))
    marks["after_policy"] = rss()
    ref = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ref.requires_grad_(False)
    ref.eval()
    out = Path(spec["work"]) / "run-b"
    # the TrainingArguments align's trainer_arguments() gives on CPU, and align dpo's defaults (lr 5e-5, beta 0.1)
    args = DPOConfig(
        output_dir=str(out / "checkpoints"), max_steps=spec["steps"], num_train_epochs=1.0, learning_rate=5e-5,
        lr_scheduler_type="cosine", warmup_steps=0.0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=spec["batch_size"], per_device_eval_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, logging_steps=1, logging_first_step=True, save_strategy="steps",
        save_steps=10_000, save_total_limit=2, eval_strategy="no", eval_on_start=False, eval_steps=1,
        seed=spec["seed"], data_seed=spec["seed"], bf16=False, fp16=False, use_cpu=True,
        gradient_checkpointing=False, report_to="none", disable_tqdm=False, dataloader_pin_memory=False,
        max_length=1024, beta=0.1, loss_type=["sigmoid"], loss_weights=None, label_smoothing=0.0,
        precompute_ref_log_probs=False,
    )
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tokenizer,
                         train_dataset=hf_datasets.Dataset.from_list(pairs))
    trainer.train()
    marks["end"] = rss()
    return {"rss": marks, "losses": _losses(trainer.state.log_history), "steps": len(timer.end),
            "step_s": _step_times(timer), "ref_adapter": seen["ref_adapter"],
            "separate_ref_model": seen["separate_ref_model"], "args": _args_dict(trainer)}


def worker_timing(spec: dict) -> dict:
    """`align dpo` with precompute_ref_log_probs on/off; times steps, the weight hash and the precompute pass."""
    from align.stages.dpo import DPOConfig, main

    timer, marks = Timer(), {}
    seen = instrument_dpo_trainer(timer, marks)
    precompute = spec["precompute"]
    main(DPOConfig.from_kwargs(
        model=spec["model"], data="arith-prefs", output=str(Path(spec["work"]) / f"run-{int(precompute)}-{spec['round']}"),
        max_steps=spec["steps"], batch_size=spec["batch_size"], seed=spec["seed"], tensorboard=False,
        logging_steps=1, save_steps=10_000, precompute_ref_log_probs=precompute,
    ))
    steps = _step_times(timer)
    warm = spec["warmup"]
    (busy0, own0), (busy1, own1) = timer.cpu[0], timer.cpu[-1]
    span = timer.end[-1] - timer.events["train_begin"]
    return {
        "precompute": precompute,
        "steps": len(steps),
        "median_step_s": statistics.median(steps[warm:]),
        "step_s": steps,
        "hash_s": sum(seen["hash"]),
        "precompute_pass_s": sum(seen["precompute"]),
        "trainer_init_s": timer.events["trainer_ready"] - timer.events["trainer_init"],
        "total_s": timer.end[-1] - timer.events["trainer_init"],
        "steps_total_s": span,
        "foreign_cpu": max(0.0, (busy1 - busy0) - (own1 - own0)) / span,
        "losses": _losses(seen["trainer"].state.log_history),
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
    args_a, args_b = runs["a_align_adapter_ref"].pop("args"), runs["b_separate_ref_model"].pop("args")
    args_diff = {k: [args_a.get(k), args_b.get(k)] for k in sorted(set(args_a) | set(args_b))
                 if args_a.get(k) != args_b.get(k)}
    return {"model": {**size, "vocab_size": 1024, **info}, "steps": args.mem_steps, "trl_args_differ": args_diff, "batch_size": args.batch_size,
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
            waited.append(0.0 if args.quick else wait_quiet(timeout=args.quiet_timeout))
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
    parser.add_argument("--quiet-timeout", type=float, default=30.0,
                        help="seconds to wait for other processes to go idle before each timed run")
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
        ["(a) align: ref adapter copy", a["before_model"]["rss_mib"], a["models_loaded"]["rss_mib"], a["end"]["peak_mib"]],
        ["(b) separate ref model", b["before_model"]["rss_mib"], b["models_loaded"]["rss_mib"], b["end"]["peak_mib"]],
    ]))
    if memory["trl_args_differ"]:
        print("TRL arguments differ between (a) and (b):", memory["trl_args_differ"])
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
