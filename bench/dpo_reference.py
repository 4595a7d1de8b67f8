"""What the DPO reference model costs in `align dpo`: memory of align's adapter-copy reference vs a separate
reference model, and step time with and without precomputed reference log-probs.

    python bench/dpo_reference.py                  # ~7-9 minutes on this 2-core CPU, offline
    python bench/dpo_reference.py --smoke          # tiny sizes, both parts, bf16 checkpoint only, no JSON
    python bench/dpo_reference.py --part timing    # rerun one part; replaces that part in the results JSON

Part 1 - peak memory. A random-weight tiny Qwen2 large enough that its fp32 weights dominate the process
(align.tiny.build_tiny_model: hidden 2048, 12 layers (--big-layers), 16 heads, vocab 1024: 506 M params,
1928 MiB in fp32), LoRA DPO for --mem-steps steps, each variant in its own fresh subprocess so peaks do not mix:
  (a) align: `align.stages.dpo.main(DPOConfig.from_kwargs(...))`, i.e. a PeftModel with a fresh LoRA adapter and
      `ref_model=None`: TRL copies the trainable "default" adapter into a frozen "ref" adapter of the same model;
  (b) separate reference, plain TRL + PEFT: the base loaded with AutoModelForCausalLM, the same LoRA config
      (align's defaults: r 16, alpha 32, dropout 0.05, all-linear), the same seed and the same DPOConfig values
      align passes on CPU, plus the base loaded a second time (frozen, eval) and passed as `ref_model=` to TRL's
      DPOTrainer. The policy's adapter is fresh (B = 0), so the bare base is exactly its reference.
Same steps, same data (bundled `arith-prefs`, data/samples/arith_prefs.jsonl, through
align.data.preference.load_preferences -> datasets.Dataset.from_list), same batch size; the script checks that
both runs log the same per-step losses and that TRL's TrainingArguments are equal.
Peak = getrusage(RUSAGE_SELF).ru_maxrss of the worker. RSS is also read after the imports (before any model),
when DPOTrainer is constructed (models loaded) and after step 1; a thread samples RSS and PSS every 0.1 s
(max during training reported separately: ru_maxrss also catches short spikes while from_pretrained converts a
checkpoint). PSS counts a page that is mapped twice only once, which matters here: the pair runs on two
checkpoints of the same weights,
  - bf16 checkpoint (like most hub checkpoints): align loads it as fp32 on CPU, so each copy of the weights is
    private memory: the case the memory goal is about;
  - fp32 checkpoint (as `align tiny-model` writes it): the weights stay memory-mapped from the safetensors file,
    so (b)'s two copies are the same page-cache pages: RSS counts them twice, PSS once.
Goal (issue): peak RSS (a) / (b) <= 0.6.

Part 2 - step time of `align dpo` with `precompute_ref_log_probs` False vs True, on a mid-sized tiny model
(hidden 512, 4 layers, 8 heads: 11 M params), --steps steps, batch 8, same data and seed, each run in a fresh
subprocess, interleaved A B / B A over --rounds rounds. Step time = on_step_begin -> on_step_end of the Trainer
(forward, backward, optimizer), median over the steps after --warmup; the table shows medians over rounds. The
one-off precompute cost is timed separately: TRL's hash of the model weights (the cache key of the precomputed
columns) and the reference forward pass over the *whole* training set (TRL precomputes every example, however
few steps are trained). "Total" = wall time from the start of DPOTrainer construction to the end of the last
step (tokenization + precompute if on + all steps). Before each timed run the script waits (up to
--quiet-timeout s, default 20) for other processes to go idle, and records how many cores' worth of CPU other
processes used during the steps (`foreign_cpu`) and during trainer construction (`foreign_cpu_trainer_init`,
which contains the precompute pass): on this 2-core machine another busy process slows a run several-fold, so a
run during which others used more than --max-foreign cores (0.25) is repeated, up to --retries (2) times; the
repeated runs are kept in the JSON under `discarded_busy_runs`.

Results: bench/results/dpo_reference.json and tables on stdout. Everything is local (no hub, no network).
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
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS_DIR,
    add_smoke_flag,
    cpu_seconds,
    finite,
    offline,
    smoke_check,
    smoke_mode,
    table,
    wait_quiet,
    write_results,
)

GOAL = 0.6
BIG = dict(hidden_size=2048, num_layers=12, num_heads=16)
MID = dict(hidden_size=512, num_layers=4, num_heads=8)
SMOKE = dict(hidden_size=256, num_layers=2, num_heads=4)  # --smoke: one model for both parts
VARIANTS = (("a_align_adapter_ref", "memory_align"), ("b_separate_ref_model", "memory_separate"))


# -- worker side -----------------------------------------------------------------------------------------------
def rss() -> dict:
    """This process's current RSS (anonymous / file-backed parts), PSS and peak RSS so far, in MiB."""
    import resource

    out = {}
    for name in ("status", "smaps_rollup"):
        try:
            with open(f"/proc/self/{name}") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if value.strip().endswith("kB"):
                        out.setdefault(key, int(value.split()[0]) / 1024)
        except OSError:
            pass
    return {"rss_mib": out["VmRSS"], "anon_mib": out.get("RssAnon"), "file_mib": out.get("RssFile"),
            "pss_mib": out.get("Pss"), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class PssSampler(threading.Thread):
    """Samples this process's RSS and PSS every `interval` s; keeps the maxima per phase ("load": until
    DPOTrainer is constructed, "train": from then on)."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        self.interval, self.stop, self.phase = interval, threading.Event(), "load"
        self.max = {"load": {"rss": 0.0, "pss": 0.0}, "train": {"rss": 0.0, "pss": 0.0}}

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)

    def sample(self) -> None:
        try:
            with open("/proc/self/smaps_rollup") as fh:
                for line in fh:
                    key = line.split(":")[0].lower()
                    if key in ("rss", "pss"):
                        peak = self.max[self.phase]
                        peak[key] = max(peak[key], int(line.split()[1]) / 1024)
        except OSError:
            pass


class Timer:
    """Per-step timestamps, machine / own CPU seconds, and RSS after the first step, for one training run."""

    def __init__(self, marks: dict, sampler: PssSampler | None = None):
        self.sampler = sampler
        self.begin: list[float] = []
        self.end: list[float] = []
        self.cpu: list[tuple[float, float]] = []
        self.events: dict[str, float] = {}
        self.marks = marks

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
                timer.marks.setdefault("after_step1", rss())

        return _StepTimer()

    def step_times(self) -> list[float]:
        return [e - b for b, e in zip(self.begin, self.end, strict=True)]


def instrument_dpo_trainer(timer: Timer) -> dict:
    """Hook TRL's DPOTrainer (not align's internals, so align can change underneath): RSS when it is constructed
    (models loaded), the time of its construction, TRL's weight hash and precompute pass, a step-timing callback."""
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
        timer.marks.setdefault("models_loaded", rss())
        if timer.sampler is not None:
            timer.sampler.sample()
            timer.sampler.phase = "train"
        timer.events.setdefault("trainer_init", time.perf_counter())
        seen["cpu_init"] = cpu_seconds()
        original_init(self, *a, **k)
        timer.events["trainer_ready"] = time.perf_counter()
        seen["cpu_ready"] = cpu_seconds()
        self.add_callback(timer.callback())
        seen["trainer"] = self
        seen["ref_adapter"] = "ref" in getattr(self.model, "peft_config", {})
        seen["separate_ref_model"] = self.ref_model is not None

    DPOTrainer.__init__ = init
    return seen


def _losses(log_history) -> list[float]:
    return [round(float(m["loss"]), 6) for m in log_history if "loss" in m]


def _memory_result(timer: Timer, seen: dict) -> dict:
    sampler = timer.sampler
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    timer.marks["end"] = rss()
    trainer = seen["trainer"]
    return {"rss": timer.marks, "peak_rss_mib": timer.marks["end"]["peak_rss_mib"],
            "peak_pss_mib": max(p["pss"] for p in sampler.max.values()), "sampled_peaks_mib": sampler.max,
            "losses": _losses(trainer.state.log_history), "steps": len(timer.end), "step_s": timer.step_times(),
            "ref_adapter": seen["ref_adapter"], "separate_ref_model": seen["separate_ref_model"],
            "args": {k: repr(v) for k, v in trainer.args.to_dict().items() if k not in ("output_dir", "logging_dir")}}


def worker_memory_align(spec: dict) -> dict:
    """(a) align's path: `align dpo` (ref_model=None on a PeftModel -> frozen "ref" adapter copy)."""
    import datasets  # noqa: F401  (imported before the baseline RSS, as in (b))
    import peft  # noqa: F401

    from align.stages.dpo import DPOConfig, main

    timer = Timer({}, PssSampler())
    seen = instrument_dpo_trainer(timer)
    timer.marks["before_model"] = rss()  # after imports
    timer.sampler.start()
    main(DPOConfig.from_kwargs(
        model=spec["model"], data="arith-prefs", output=str(Path(spec["work"]) / f"run-a-{spec['tag']}"),
        max_steps=spec["steps"], batch_size=spec["batch_size"], seed=spec["seed"], tensorboard=False,
        logging_steps=1, save_steps=10_000,
    ))
    return _memory_result(timer, seen)


def worker_memory_separate(spec: dict) -> dict:
    """(b) plain TRL + PEFT: the same LoRA policy and DPO settings as align's (a), plus a second copy of the base
    loaded with AutoModelForCausalLM and passed as ref_model= to DPOTrainer."""
    import datasets as hf_datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    import align.stages.dpo  # noqa: F401  (imported before the baseline RSS, as in (a))
    from align.data.preference import load_preferences

    timer = Timer({}, PssSampler())
    seen = instrument_dpo_trainer(timer)
    timer.marks["before_model"] = rss()  # after imports
    timer.sampler.start()
    pairs, _ = load_preferences("arith-prefs")
    set_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    policy = get_peft_model(policy, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                               task_type="CAUSAL_LM"))
    timer.marks["policy_loaded"] = rss()
    ref = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ref.requires_grad_(False)
    ref.eval()
    out = Path(spec["work"]) / f"run-b-{spec['tag']}"
    # the TrainingArguments that align's trainer_arguments() gives on CPU, and align dpo's defaults (lr 5e-5, beta
    # 0.1, sigmoid loss, max_length 1024)
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
    return _memory_result(timer, seen)


def worker_timing(spec: dict) -> dict:
    """`align dpo` with precompute_ref_log_probs on/off; times steps, the weight hash and the precompute pass."""
    from align.stages.dpo import DPOConfig, main

    timer = Timer({})
    seen = instrument_dpo_trainer(timer)
    precompute = spec["precompute"]
    main(DPOConfig.from_kwargs(
        model=spec["model"], data="arith-prefs",
        output=str(Path(spec["work"]) / f"run-t{int(precompute)}-{spec['round']}"),
        max_steps=spec["steps"], batch_size=spec["batch_size"], seed=spec["seed"], tensorboard=False,
        logging_steps=1, save_steps=10_000, precompute_ref_log_probs=precompute,
    ))
    steps = timer.step_times()
    (busy0, own0), (busy1, own1) = timer.cpu[0], timer.cpu[-1]
    span = timer.end[-1] - timer.events["train_begin"]
    return {
        "precompute": precompute,
        "steps": len(steps),
        "median_step_s": statistics.median(steps[spec["warmup"]:]),
        "step_s": steps,
        "hash_s": sum(seen["hash"]),
        "precompute_pass_s": sum(seen["precompute"]),
        "trainer_init_s": timer.events["trainer_ready"] - timer.events["trainer_init"],
        "total_s": timer.end[-1] - timer.events["trainer_init"],
        "steps_total_s": span,
        "foreign_cpu": max(0.0, (busy1 - busy0) - (own1 - own0)) / span,
        "foreign_cpu_trainer_init": _foreign(seen["cpu_init"], seen["cpu_ready"],
                                             timer.events["trainer_ready"] - timer.events["trainer_init"]),
        "losses": _losses(seen["trainer"].state.log_history),
        "peak_rss_mib": rss()["peak_rss_mib"],
    }


def _foreign(start: tuple[float, float], end: tuple[float, float], seconds: float) -> float:
    """Cores' worth of CPU that other processes used between two cpu_seconds() samples."""
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / seconds


def worker_build(spec: dict) -> dict:
    """Build the tiny model (fp32 safetensors); optionally also a bf16 copy of the same weights."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.tiny import build_tiny_model

    build_tiny_model(spec["path"], vocab_size=1024, **spec["size"])
    if spec.get("bf16_path"):
        AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.bfloat16).save_pretrained(spec["bf16_path"])
        AutoTokenizer.from_pretrained(spec["path"]).save_pretrained(spec["bf16_path"])
    params = 0
    for file in Path(spec["path"]).glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            params += sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())
    return {"params": params, "fp32_mib": params * 4 / 2**20}


WORKERS = {"build": worker_build, "memory_align": worker_memory_align, "memory_separate": worker_memory_separate,
           "timing": worker_timing}


# -- driver ----------------------------------------------------------------------------------------------------
def busy_processes(window: float = 1.0, min_cores: float = 0.2) -> list[str]:
    """Command lines of other processes that used more than `min_cores` of CPU over `window` seconds (none looked
    for in smoke mode)."""
    if smoke_mode():
        return []

    def sample() -> dict[int, tuple[float, str]]:
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, IndexError):
                continue
            out[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), cmd[:150])
        return out

    before = sample()
    time.sleep(window)
    after = sample()
    return [cmd or f"pid {pid}" for pid, (cpu, cmd) in after.items()
            if pid in before and (cpu - before[pid][0]) / window > min_cores]


def spawn(kind: str, spec: dict, work: Path) -> dict:
    """Run one worker in a fresh Python process; returns its JSON result."""
    spec_path = work / f"spec-{kind}-{time.monotonic_ns()}.json"
    out_path = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps({**spec, "work": str(work)}))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, str(spec_path), str(out_path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"worker {kind} failed (exit {proc.returncode})")
    return {**json.loads(out_path.read_text()), "process_wall_s": time.perf_counter() - t0}


_BUILT: dict[str, tuple[Path, dict]] = {}


def build(size: dict, path: Path, bf16_path: Path | None, work: Path) -> tuple[Path, dict]:
    """The fp32 model of this size (built in a worker, once per size: --smoke's two parts share one) and its info."""
    key = json.dumps(size)
    if key not in _BUILT or bf16_path is not None:
        spec = {"path": str(path), "size": size, **({"bf16_path": str(bf16_path)} if bf16_path else {})}
        _BUILT[key] = (path, spawn("build", spec, work))
    return _BUILT[key]


def memory_part(args, work: Path, log) -> dict:
    size = SMOKE if args.smoke else {**BIG, "num_layers": args.big_layers}
    paths = {"bf16": work / "big-bf16", "fp32": work / "big-fp32"}
    t0 = time.perf_counter()
    _, info = build(size, paths["fp32"], paths["bf16"], work)
    log(f"built {size} ({info['params'] / 1e6:.0f} M params, {info['fp32_mib']:.0f} MiB in fp32), fp32 and bf16 "
        f"checkpoints, in {time.perf_counter() - t0:.0f} s")
    others = set(busy_processes())
    checkpoints = {}
    for ckpt, path in paths.items():
        if ckpt == "fp32" and args.no_fp32_checkpoint:
            continue
        spec = {"model": str(path), "steps": args.mem_steps, "batch_size": args.mem_batch_size, "seed": args.seed,
                "tag": ckpt}
        runs = {}
        for name, kind in VARIANTS:
            others.update(busy_processes())
            runs[name] = spawn(kind, spec, work)
            log(f"memory, {ckpt} checkpoint, {name}: peak RSS {runs[name]['peak_rss_mib']:.0f} MiB, peak PSS "
                f"{runs[name]['peak_pss_mib']:.0f} MiB ({runs[name]['process_wall_s']:.0f} s)")
        a, b = (runs[name] for name, _ in VARIANTS)
        args_a, args_b = a.pop("args"), b.pop("args")
        checkpoints[ckpt] = {
            "runs": runs,
            "ratio_peak_rss": a["peak_rss_mib"] / b["peak_rss_mib"],
            "ratio_peak_pss": a["peak_pss_mib"] / b["peak_pss_mib"],
            "ratio_training_rss": a["sampled_peaks_mib"]["train"]["rss"] / b["sampled_peaks_mib"]["train"]["rss"],
            "reference_cost_peak_rss_mib": b["peak_rss_mib"] - a["peak_rss_mib"],
            "reference_cost_peak_pss_mib": b["peak_pss_mib"] - a["peak_pss_mib"],
            "goal_met_rss": a["peak_rss_mib"] / b["peak_rss_mib"] <= GOAL,
            "losses_identical": a["losses"] == b["losses"],
            "trl_args_differ": {k: [args_a.get(k), args_b.get(k)] for k in sorted(set(args_a) | set(args_b))
                                if args_a.get(k) != args_b.get(k)},
        }
    return {"model": {**size, "vocab_size": 1024, **info}, "steps": args.mem_steps, "batch_size": args.mem_batch_size,
            "goal": GOAL, "checkpoints": checkpoints, "busy_processes_seen": sorted(others)}


def timing_part(args, work: Path, log) -> dict:
    size = SMOKE if args.smoke else MID
    path, info = build(size, work / "mid", None, work)
    spec = {"model": str(path), "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
            "warmup": args.warmup}
    runs: dict[str, list] = {"off": [], "on": []}
    others, waited, discarded = set(), [], []
    for r in range(args.rounds):
        for precompute in ((False, True) if r % 2 == 0 else (True, False)):
            for attempt in range(args.retries + 1):
                others.update(busy_processes())
                timeout = args.quiet_timeout * (1 + 2 * attempt)
                waited.append(wait_quiet(timeout=timeout))
                res = spawn("timing", {**spec, "precompute": precompute, "round": f"{r}-{attempt}"}, work)
                res["clean"] = max(res["foreign_cpu"], res["foreign_cpu_trainer_init"]) <= args.max_foreign
                log(f"timing, round {r}, precompute={precompute}: median step {res['median_step_s'] * 1000:.0f} ms, "
                    f"hash {res['hash_s']:.2f} s, precompute pass {res['precompute_pass_s']:.1f} s, total "
                    f"{res['total_s']:.1f} s, foreign cpu {res['foreign_cpu']:.2f} (steps) / "
                    f"{res['foreign_cpu_trainer_init']:.2f} (trainer init)" + ("" if res["clean"] else " -> busy"))
                if res["clean"] or attempt == args.retries:
                    runs["on" if precompute else "off"].append(res)
                    break
                discarded.append(res)
    keys = ("median_step_s", "hash_s", "precompute_pass_s", "trainer_init_s", "total_s", "steps_total_s", "foreign_cpu",
            "foreign_cpu_trainer_init")
    median = {side: {k: statistics.median(r[k] for r in rs) for k in keys} for side, rs in runs.items()}
    saved = median["off"]["median_step_s"] - median["on"]["median_step_s"]
    one_off = median["on"]["hash_s"] + median["on"]["precompute_pass_s"]
    return {"model": {**size, "vocab_size": 1024, **info}, "steps": args.steps, "warmup": args.warmup,
            "batch_size": args.batch_size, "rounds": args.rounds, "train_examples": 1000, "median": median,
            "step_time_off_over_on": median["off"]["median_step_s"] / median["on"]["median_step_s"],
            "saved_per_step_s": saved, "one_off_precompute_s": one_off,
            "break_even_steps": one_off / saved if saved > 0 else None,
            "losses_identical_off_on": all(r["losses"] == runs["off"][0]["losses"] for r in runs["off"] + runs["on"]),
            "losses_within_1e-5_off_on": all(abs(x - y) <= 1e-5 for r in runs["off"] + runs["on"]
                                             for x, y in zip(r["losses"], runs["off"][0]["losses"], strict=True)),
            "max_abs_loss_diff_off_on": max(abs(x - y) for r in runs["on"]
                                            for x, y in zip(r["losses"], runs["off"][0]["losses"], strict=True)),
            "max_foreign_cpu": args.max_foreign,
            "all_kept_runs_clean": all(r["clean"] for rs in runs.values() for r in rs),
            "runs": runs, "discarded_busy_runs": discarded, "waited_for_quiet_s": waited,
            "busy_processes_seen": sorted(others)}


def report(memory: dict | None, timing: dict | None) -> None:
    if memory:
        report_memory(memory)
    if timing:
        report_timing(timing)


def report_memory(memory: dict) -> None:
    model = memory["model"]
    print(f"\nPeak memory, LoRA DPO, {model['params'] / 1e6:.0f} M params ({model['fp32_mib']:.0f} MiB in fp32), "
          f"{memory['steps']} steps, batch {memory['batch_size']}, MiB:")
    rows = []
    for ckpt, c in memory["checkpoints"].items():
        for name, _ in VARIANTS:
            r = c["runs"][name]
            marks = r["rss"]
            rows.append([f"{ckpt} ckpt", name, marks["before_model"]["rss_mib"], marks["models_loaded"]["rss_mib"],
                         marks["after_step1"]["rss_mib"], r["sampled_peaks_mib"]["train"]["rss"], r["peak_rss_mib"],
                         r["peak_pss_mib"]])
        rows.append([f"{ckpt} ckpt", "ratio (a)/(b)", "", "", "", c["ratio_training_rss"], c["ratio_peak_rss"],
                     c["ratio_peak_pss"]])
    print(table(["checkpoint", "variant", "RSS imports", "RSS models loaded", "RSS after step 1",
                 "max RSS training", "peak RSS", "peak PSS"], rows))
    for ckpt, c in memory["checkpoints"].items():
        print(f"{ckpt} checkpoint: peak RSS (a)/(b) = {c['ratio_peak_rss']:.3f} -> goal <= {GOAL} "
              f"{'met' if c['goal_met_rss'] else 'NOT met'}; same losses: {c['losses_identical']}; "
              f"TRL args differing: {c['trl_args_differ'] or 'none'}")


def report_timing(timing: dict) -> None:
    m = timing["median"]
    print(f"\nalign dpo step time, {timing['model']['params'] / 1e6:.1f} M params, {timing['steps']} steps, batch "
          f"{timing['batch_size']}, {timing['rounds']} rounds (medians):")
    print(table(["precompute_ref_log_probs", "step ms", "hash s", "precompute pass s", "total s", "foreign cpu"], [
        [name, 1000 * m[key]["median_step_s"], m[key]["hash_s"], m[key]["precompute_pass_s"], m[key]["total_s"],
         m[key]["foreign_cpu"]] for name, key in (("False", "off"), ("True", "on"))
    ]))
    be = timing["break_even_steps"]
    print(f"step time off/on = {timing['step_time_off_over_on']:.2f}x; one-off precompute "
          f"{timing['one_off_precompute_s']:.1f} s; pays off after {'never' if be is None else f'{be:.0f}'} steps; "
          f"all kept runs quiet: {timing.get('all_kept_runs_clean', '?')} ({len(timing.get('discarded_busy_runs', []))} busy runs "
          f"repeated); losses off/on within 1e-5: {timing['losses_within_1e-5_off_on']} "
          f"(max diff {timing['max_abs_loss_diff_off_on']:.1e})")


def smoke_checks(memory: dict | None, timing: dict | None, args) -> dict[str, bool]:
    """Each side of each part ran its steps and measured what it claims."""
    checks = {}
    if args.part in ("all", "memory"):
        runs = memory["checkpoints"]["bf16"]["runs"]
        for name, _ in VARIANTS:
            r = runs.get(name, {})
            checks[f"memory, {name}: {args.mem_steps} steps with losses and a peak RSS / PSS"] = (
                r.get("steps") == args.mem_steps and len(r.get("losses", [])) >= args.mem_steps
                and finite(r.get("peak_rss_mib"), r.get("peak_pss_mib")))
        checks["memory: (a) trained with TRL's 'ref' adapter copy, (b) with a separate reference model"] = (
            runs["a_align_adapter_ref"].get("ref_adapter") is True
            and runs["b_separate_ref_model"].get("separate_ref_model") is True)
    if args.part in ("all", "timing"):
        for side, precompute in (("off", False), ("on", True)):
            rs = timing["runs"][side]
            checks[f"timing, precompute {side}: {args.rounds} run(s) of {args.steps} timed steps"] = (
                len(rs) == args.rounds and all(r["steps"] == args.steps and r["precompute"] is precompute
                                               and finite(r["median_step_s"], *r["step_s"]) for r in rs))
        checks["timing: the precompute pass and TRL's weight hash were timed"] = all(
            r["precompute_pass_s"] > 0 and r["hash_s"] > 0 for r in timing["runs"]["on"])
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mem-batch-size", type=int, default=2)
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--big-layers", type=int, default=BIG["num_layers"], help="layers of the memory-part model")
    parser.add_argument("--no-fp32-checkpoint", action="store_true",
                        help="memory part on the bf16 checkpoint only (skips the mmapped fp32 case, ~2-3 min)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the step-time part")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet-timeout", type=float, default=20.0,
                        help="seconds to wait for other processes to go idle before each timed run")
    parser.add_argument("--part", choices=("all", "memory", "timing"), default="all",
                        help="run one part only; its results replace that part in an existing results JSON")
    parser.add_argument("--max-foreign", type=float, default=0.25,
                        help="a timed run during which other processes used more cores than this is repeated")
    parser.add_argument("--retries", type=int, default=2, help="repeats of a timed run that overlapped other work")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    add_smoke_flag(parser, "one hidden-256 model for both parts, bf16 checkpoint only, 2 memory steps, 4 timed steps "
                           "(2 warm-up), one round, no repeats")
    args = parser.parse_args()
    offline()
    if args.worker:
        kind, spec_path, out_path = args.worker
        Path(out_path).write_text(json.dumps(WORKERS[kind](json.loads(Path(spec_path).read_text()))))
        return
    if smoke_mode(args.smoke):
        args.steps, args.warmup, args.rounds, args.mem_steps, args.retries = 4, 2, 1, 2, 0
        args.no_fp32_checkpoint = True
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:4.0f} s] {msg}", flush=True)

    previous = {}
    results_file = RESULTS_DIR / "dpo_reference.json"
    if args.part != "all" and results_file.is_file():
        previous = json.loads(results_file.read_text())
    with tempfile.TemporaryDirectory(prefix="bench-dpo-ref-") as tmp:
        memory = memory_part(args, Path(tmp), log) if args.part != "timing" else previous.get("memory")
        timing = timing_part(args, Path(tmp), log) if args.part != "memory" else previous.get("timing")
    report(memory if args.part != "timing" else None, timing if args.part != "memory" else None)  # this run's parts
    if args.smoke:
        return smoke_check("dpo_reference", smoke_checks(memory, timing, args))
    if not args.no_write:
        command = "python bench/dpo_reference.py " + " ".join(sys.argv[1:])
        parts = {"memory": memory, "timing": timing}
        commands = dict(previous.get("commands", {}))
        commands.update({part: command.strip() for part in parts if args.part in ("all", part)})
        wall = dict(previous.get("wall_s", {})) if isinstance(previous.get("wall_s"), dict) else {}
        wall[args.part] = time.perf_counter() - started
        path = write_results("dpo_reference", {"commands": commands, **parts, "wall_s": wall})
        print(f"\nwrote {path}")
    log("done")


if __name__ == "__main__":
    main()
