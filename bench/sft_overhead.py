"""Overhead of `align sft` over plain TRL: the same LoRA SFT run through `align.sft(...)` and through the
idiomatic TRL code a user would write by hand, measured side by side in one process.

    python bench/sft_overhead.py            # ~2 minutes on a 2-core CPU
    python bench/sft_overhead.py --rounds 5 --steps 120

Both sides: the same tiny Qwen2 (align.tiny.build_tiny_model, hidden 256, 4 layers, 4 heads, random weights,
built into a temp dir), the bundled `arith` sample (align/data/samples/arith_sft.jsonl, a "messages" column),
the same steps, seed, batch size, max_length, learning rate and schedule, LoRA r=16 / alpha=32 / dropout 0.05
on all-linear, packing off, fp32 on CPU, no gradient checkpointing, loss on the assistant turn only.

The plain-TRL side loads the model with AutoModelForCausalLM, passes a LoraConfig as `peft_config` and the
raw "messages" dataset, and uses SFTConfig(assistant_only_loss=True) with a copy of the tiny model's ChatML
template that has `{% generation %}` markers (TRL needs them for assistant-only loss). That masks exactly the
tokens align masks (the reply and its `<|im_end|>\n`), so both sides see identical batches: the script checks
that the non-pad and trained token counts agree step for step, and reports the loss of both.

Throughput = steps / seconds from the end of step `--warmup` to the end of the last step, i.e. the steady-state
wall-clock rate of the training loop (data collation, forward, backward, optimizer, logging callbacks and any
checkpoint save inside the loop included; model loading, tokenization and the final adapter save excluded).
Sides alternate A B A B ... for `--rounds` rounds; the medians and their ratio align/TRL are reported. Results:
bench/results/sft_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import StepProbe, install_probe, offline, table, use_probe, wait_quiet, write_results  # noqa: E402

GOAL = 0.97
MODEL = dict(hidden_size=256, num_layers=4, num_heads=4)

# The tiny model's ChatML template (align.tiny.CHAT_TEMPLATE) with TRL's generation markers around what the
# assistant turn adds: its content and the end-of-turn marker.
TRL_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}{% generation %}{{- message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def arith_path() -> Path:
    import align.data.samples as samples

    return Path(samples.__file__).parent / "arith_sft.jsonl"


def run_align(model_dir: Path, work: Path, args, probe: StepProbe) -> dict:
    import align

    use_probe(probe)
    t0 = time.perf_counter()
    run_dir = align.sft(
        model=str(model_dir), data="arith", output=str(work / "align-run"), overwrite=True,
        max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        lr=2e-4, lr_scheduler="cosine", adapter="lora", lora_r=16, lora_alpha=32, lora_dropout=args.lora_dropout,
        target_modules=["all-linear"], packing=False, gradient_checkpointing=False, logging_steps=10,
    )
    total = time.perf_counter() - t0
    use_probe(None)
    manifest = json.loads((Path(run_dir) / "run.json").read_text())
    losses = [m["loss"] for m in _metrics(Path(run_dir) / "metrics.jsonl") if "loss" in m]
    return {"total_s": total, "train_runtime": manifest["metrics"]["train_runtime"], "losses": losses}


def run_trl(model_dir: Path, work: Path, args, probe: StepProbe) -> dict:
    """What a user would write with TRL directly."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    template = work / "chatml_generation.jinja"
    template.write_text(TRL_TEMPLATE)
    use_probe(probe)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=str(arith_path()), split="train")
    config = SFTConfig(
        output_dir=str(work / "trl-run"),
        max_steps=args.steps, per_device_train_batch_size=args.batch_size, max_length=args.max_length,
        seed=args.seed, learning_rate=2e-4, lr_scheduler_type="cosine", logging_steps=10,
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        packing=False, assistant_only_loss=True, chat_template_path=str(template),
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    result = trainer.train()
    trainer.save_model(str(work / "trl-run" / "adapter"))
    total = time.perf_counter() - t0
    use_probe(None)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"total_s": total, "train_runtime": result.metrics["train_runtime"], "losses": losses}


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds (each side runs this many times)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from the throughput")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout, both sides (align's default)")
    parser.add_argument("--max-foreign-cpu", type=float, default=0.1,
                        help="repeat a run when other processes used more than this many cores meanwhile")
    parser.add_argument("--retries", type=int, default=6, help="repeats of a contended run (the last one is kept)")
    args = parser.parse_args(argv)

    offline()
    import torch

    from align.tiny import build_tiny_model

    install_probe()
    with tempfile.TemporaryDirectory(prefix="bench-sft-overhead-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "tiny", **MODEL)
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
        sides = {"align": run_align, "trl": run_trl}
        runs: dict[str, list[dict]] = {"align": [], "trl": []}
        discarded: list[dict] = []
        probes: dict[str, list[StepProbe]] = {"align": [], "trl": []}
        # Untimed warm-up of both code paths (first-call costs: imports, kernels, allocator), then the A/B rounds.
        warm = argparse.Namespace(**{**vars(args), "steps": 12})
        for name in ("align", "trl"):
            sides[name](model_dir, work, warm, StepProbe(pad_id))
        for r in range(args.rounds):
            order = ["align", "trl"] if r % 2 == 0 else ["trl", "align"]  # ABBA...: neither side always goes first
            for name in order:
                for attempt in range(args.retries + 1):
                    waited = wait_quiet(args.max_foreign_cpu)
                    if waited > 3:
                        print(f"  (waited {waited:.0f} s for other processes to go quiet)", flush=True)
                    last = attempt == args.retries
                    probe = StepProbe(pad_id, abort_above=None if last else args.max_foreign_cpu)
                    out = sides[name](model_dir, work, args, probe)
                    if probe.aborted:
                        print(f"round {r + 1} {name:5s}: other processes took CPU at step {len(probe.end)}; "
                              "stopped, repeating", flush=True)
                        discarded.append({"side": name, "round": r + 1, "aborted_at_step": len(probe.end)})
                        continue
                    out.update(probe.steady(args.warmup))
                    out["round"], out["attempt"] = r + 1, attempt
                    quiet = out["foreign_cpu"] <= args.max_foreign_cpu
                    print(f"round {r + 1} {name:5s}: {out['steps_per_s']:.2f} steps/s "
                          f"(median step {out['median_step_wall_ms']:.1f} ms wall, "
                          f"{out['median_step_compute_ms']:.1f} ms step_begin..step_end), "
                          f"train_runtime {out['train_runtime']:.2f} s, total {out['total_s']:.1f} s, "
                          f"other processes' CPU {out['foreign_cpu']:.2f} cores"
                          + ("" if quiet or last else " -> contended, repeated"), flush=True)
                    if quiet or last:
                        break
                    discarded.append({"side": name, **out})
                runs[name].append(out)
                probes[name].append(probe)

    # Identical work: same batches (token counts) step for step, same trained tokens.
    a, t = probes["align"][0], probes["trl"][0]
    same_batches = a.real_tokens == t.real_tokens and a.trained_tokens == t.trained_tokens
    med = {k: statistics.median(x["steps_per_s"] for x in v) for k, v in runs.items()}
    med_ms = {k: statistics.median(x["median_step_wall_ms"] for x in v) for k, v in runs.items()}
    med_compute = {k: statistics.median(x["median_step_compute_ms"] for x in v) for k, v in runs.items()}
    med_runtime = {k: statistics.median(x["train_runtime"] for x in v) for k, v in runs.items()}
    med_total = {k: statistics.median(x["total_s"] for x in v) for k, v in runs.items()}
    ratio = med["align"] / med["trl"]
    by_round = {}
    for side, outs in runs.items():
        for out in outs:
            by_round.setdefault(out["round"], {})[side] = out["steps_per_s"]
    round_ratios = [v["align"] / v["trl"] for _, v in sorted(by_round.items())]

    print()
    print(f"tiny Qwen2 {MODEL}, arith, batch {args.batch_size}, {args.steps} steps/run "
          f"(first {args.warmup} excluded), {args.rounds} rounds, torch threads {torch.get_num_threads()}")
    print(table(
        ["side", "steps/s (median)", "step wall ms", "step compute ms", "train_runtime s", "total s", "runs steps/s"],
        [[k, round(med[k], 3), round(med_ms[k], 1), round(med_compute[k], 1), round(med_runtime[k], 2),
          round(med_total[k], 1), " ".join(f"{x['steps_per_s']:.2f}" for x in runs[k])] for k in runs],
    ))
    print(f"ratio align/TRL = {ratio:.3f}  (goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'}); "
          f"per round: {' '.join(f'{x:.3f}' for x in round_ratios)}")
    print(f"identical batches (non-pad and trained tokens per step): {same_batches}; "
          f"logged loss align {runs['align'][0]['losses'][-3:]} vs TRL {runs['trl'][0]['losses'][-3:]}")

    result = {
        "config": {**MODEL, **vars(args), "data": "arith", "lora": {"r": 16, "alpha": 32, "dropout": args.lora_dropout,
                   "target_modules": "all-linear"}, "packing": False, "dtype": "float32"},
        "median_steps_per_s": med, "median_step_wall_ms": med_ms, "median_step_compute_ms": med_compute,
        "median_train_runtime_s": med_runtime, "median_total_s": med_total,
        "ratio_align_over_trl": ratio, "ratio_per_round": round_ratios, "goal": GOAL, "goal_met": ratio >= GOAL,
        "identical_batches": same_batches, "runs": runs, "discarded_contended_runs": discarded,
    }
    path = write_results("sft_overhead", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
