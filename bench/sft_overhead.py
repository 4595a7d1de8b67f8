"""Overhead of `align sft` over plain TRL: the same LoRA SFT run through `align.sft(...)` and through the
idiomatic TRL code a user would write by hand, measured side by side in one run of this script.

    python bench/sft_overhead.py            # ~2-3 minutes on a quiet 2-core CPU
    python bench/sft_overhead.py --rounds 5 --steps 200
    python bench/sft_overhead.py --smoke    # one round of 12 steps in 4-step turns, batch 4, no JSON

Both sides: the same tiny Qwen2 (align.tiny.build_tiny_model, hidden 256, 4 layers, 4 heads, random weights,
built into a temp dir), the bundled `arith` sample (data/samples/arith_sft.jsonl, a "messages" column),
the same steps, seed, batch size, max_length, learning rate and schedule, LoRA r=16 / alpha=32 / dropout 0.05
on all-linear, packing off, fp32 on CPU, no gradient checkpointing, loss on the assistant turn only.

The plain-TRL side loads the model with AutoModelForCausalLM, passes a LoraConfig as `peft_config` and the
raw "messages" dataset, and uses SFTConfig(assistant_only_loss=True) with a copy of the tiny model's ChatML
template that has `{% generation %}` markers (TRL needs them for assistant-only loss). That masks exactly the
tokens align masks (the reply and its `<|im_end|>\n`), so both sides see identical batches: the script checks
that the non-pad and trained token counts agree step for step and that the logged losses are identical.

How it is timed. Each round starts two worker processes, one per side, each training in its main thread (in
a secondary Python thread, PyTorch's CPU kernels ran ~30-40% slower here, so threads would distort the
figures). They take turns, `--block` (5) optimizer steps at a time: at `on_step_begin` a worker reports its
block and waits on a pipe (blocked, no CPU) until the parent gives it the next turn, so machine conditions
drift equally for both. Rounds: `--rounds` (4), the side that starts first alternating (the side that went
first came out a few % slower in test runs, whichever it was, so an even number of rounds balances that). A block's time runs
from `on_step_begin` of its first step to `on_step_begin` of the step after its last: everything the
training loop does for those steps (batch collation, forward, backward, optimizer, the Trainer's and align's
callbacks: metrics.jsonl, TensorBoard, logging). Model loading, tokenization, the first `--warmup` (10) steps
and the final checkpoint/adapter save are outside. Throughput = steps / seconds summed over blocks. Blocks
during which other processes used more than `--max-foreign-cpu` cores (from /proc/stat; on this shared
2-core machine another busy process makes single steps take seconds) are left out together with their
partner block; extra rounds run (up to `--max-rounds`) until `--min-clean-pairs` pairs are in. Reported:
steps/s of each side, the ratio align/TRL pooled and per round, the median ratio of paired blocks, and
whether both sides had identical batches and identical logged losses. Progress bars are off on both sides
(TQDM_DISABLE=1). Results: bench/results/sft_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    TRL_TEMPLATE,
    PipeBaton,
    StepProbe,
    add_smoke_flag,
    install_probe,
    offline,
    smoke_check,
    smoke_mode,
    table,
    use_probe,
    wait_quiet,
    write_results,
)

GOAL = 0.97
MODEL = dict(hidden_size=256, num_layers=4, num_heads=4)



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


def worker(side: str, model_dir: str, work: str, args: argparse.Namespace, conn) -> None:
    """Child process: one run of `side`, taking turns through `conn`; sends ("done", result) or ("error", text)."""
    try:
        os.environ.setdefault("TQDM_DISABLE", "1")
        offline()
        install_probe()
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
        probe = StepProbe(pad_id, baton=PipeBaton(conn, args.block), name=side)
        run = {"align": run_align, "trl": run_trl}[side]
        out = run(Path(model_dir), Path(work), args, probe)
        out.update(blocks=probe.blocks, real_tokens=probe.real_tokens, trained_tokens=probe.trained_tokens,
                   compute_ms=[1000 * (e - b) for b, e in zip(probe.begin, probe.end, strict=False)])
        conn.send(("done", out))
    except BaseException:  # noqa: BLE001 - reported to the parent
        import traceback

        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_round(r: int, model_dir: Path, work: Path, args) -> dict:
    """One pair of runs (align, TRL), each in its own worker process, taking turns `args.block` steps at a time."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    order = ("align", "trl") if r % 2 == 0 else ("trl", "align")
    conns, procs = {}, {}
    for side in order:  # set up one after the other (imports, model load, tokenization), each alone
        (work / f"r{r}-{side}").mkdir(parents=True, exist_ok=True)
        parent, child = ctx.Pipe()
        procs[side] = ctx.Process(target=worker, args=(side, str(model_dir), str(work / f"r{r}-{side}"), args, child),
                                  name=f"bench-{side}")
        procs[side].start()
        child.close()
        conns[side] = parent
        kind, payload = parent.recv()
        if kind != "ready":
            raise RuntimeError(f"{side} worker failed before training:\n{payload}")
    waited = wait_quiet(args.max_foreign_cpu, timeout=60)
    outs: dict[str, dict] = {}
    blocks: dict[str, list[dict]] = {side: [] for side in order}
    while len(outs) < 2:
        for side in order:
            if side in outs:
                continue
            conns[side].send("go")
            kind, payload = conns[side].recv()
            if kind == "block":
                blocks[side].append(payload)
            elif kind == "done":
                outs[side] = payload
            else:
                raise RuntimeError(f"{side} worker failed:\n{payload}")
    for side in order:
        procs[side].join()

    # Pair the blocks: block j of each side covers the same step numbers.
    a_blocks = [b for b in outs["align"]["blocks"] if b["first_step"] >= args.warmup]
    t_blocks = [b for b in outs["trl"]["blocks"] if b["first_step"] >= args.warmup]
    pairs = [(a, t) for a, t in zip(a_blocks, t_blocks, strict=False)
             if a["foreign"] <= args.max_foreign_cpu and t["foreign"] <= args.max_foreign_cpu]
    rate = {
        "align": sum(a["steps"] for a, _ in pairs) / sum(a["s"] for a, _ in pairs) if pairs else math.nan,
        "trl": sum(t["steps"] for _, t in pairs) / sum(t["s"] for _, t in pairs) if pairs else math.nan,
    }
    pair_ratios = [(a["steps"] / a["s"]) / (t["steps"] / t["s"]) for a, t in pairs]
    same = (outs["align"]["real_tokens"] == outs["trl"]["real_tokens"]
            and outs["align"]["trained_tokens"] == outs["trl"]["trained_tokens"])
    return {
        "round": r + 1, "first": order[0], "waited_for_quiet_s": waited,
        "blocks_per_side": min(len(a_blocks), len(t_blocks)), "clean_pairs": len(pairs),
        "steps_per_s": rate, "ratio": rate["align"] / rate["trl"] if pairs else math.nan,
        "pooled": {k: {"steps": sum(p[i]["steps"] for p in pairs), "s": sum(p[i]["s"] for p in pairs)}
                   for i, k in enumerate(("align", "trl"))},
        "median_pair_ratio": statistics.median(pair_ratios) if pair_ratios else math.nan,
        "median_step_compute_ms": {k: statistics.median(o["compute_ms"][args.warmup:]) for k, o in outs.items()},
        "identical_batches": same,
        # align also logs step 1 (logging_first_step), so its step-10 loss averages steps 2-10: compare from step 20
        "identical_losses": outs["align"]["losses"][2:] == outs["trl"]["losses"][1:],
        "steps_done": {k: len(o["compute_ms"]) for k, o in outs.items()},
        "train_runtime_incl_waiting_s": {k: o["train_runtime"] for k, o in outs.items()},
        "total_s_incl_waiting": {k: o["total_s"] for k, o in outs.items()},
        "losses": {k: o["losses"] for k, o in outs.items()},
        "blocks": {k: o["blocks"] for k, o in outs.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4,
                        help="pairs of runs (align + TRL taking turns); even, so each side starts first equally often")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    parser.add_argument("--block", type=int, default=5, help="steps per turn")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the throughput")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout, both sides (align's default)")
    parser.add_argument("--max-foreign-cpu", type=float, default=0.1,
                        help="leave out blocks during which other processes used more than this many cores")
    parser.add_argument("--min-clean-pairs", type=int, default=40,
                        help="run extra rounds (up to --max-rounds) until this many clean block pairs are measured")
    parser.add_argument("--max-rounds", type=int, default=10)
    add_smoke_flag(parser, "one round of 12 steps taken 4 at a time (4 warm-up; a loss is logged at step 10), batch 4, "
                           "rows of <= 64 tokens")
    args = parser.parse_args(argv)
    if smoke_mode(args.smoke):
        args.rounds = args.max_rounds = 1
        args.steps, args.block, args.warmup, args.batch_size, args.max_length, args.min_clean_pairs = 12, 4, 4, 4, 64, 0

    os.environ.setdefault("TQDM_DISABLE", "1")
    offline()
    import torch

    from align.tiny import build_tiny_model

    install_probe()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-sft-overhead-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "tiny", **MODEL)
        rounds = []
        r = 0
        while r < args.rounds or (sum(o["clean_pairs"] for o in rounds) < args.min_clean_pairs
                                  and r < args.max_rounds):
            out = run_round(r, model_dir, work, args)
            r += 1
            rounds.append(out)
            print(f"round {r} ({out['first']} first): align {out['steps_per_s']['align']:.2f} steps/s, "
                  f"TRL {out['steps_per_s']['trl']:.2f} steps/s, ratio {out['ratio']:.3f} "
                  f"(median of {out['clean_pairs']} paired {args.block}-step blocks: {out['median_pair_ratio']:.3f}; "
                  f"{out['blocks_per_side'] - out['clean_pairs']} pairs left out as contended); "
                  f"median step_begin..step_end align {out['median_step_compute_ms']['align']:.1f} ms, "
                  f"TRL {out['median_step_compute_ms']['trl']:.1f} ms; identical batches {out['identical_batches']}, "
                  f"losses {out['identical_losses']}",
                  flush=True)

    pooled = {k: sum(o["pooled"][k]["steps"] for o in rounds) / (sum(o["pooled"][k]["s"] for o in rounds) or math.nan)
              for k in ("align", "trl")}
    ratio = pooled["align"] / pooled["trl"]
    round_ratios = [o["ratio"] for o in rounds]
    by_first = {f: [o["ratio"] for o in rounds if o["first"] == f and o["ratio"] == o["ratio"]] for f in ("align", "trl")}
    # order-balanced: geometric mean of the mean ratio of align-first rounds and that of TRL-first rounds
    balanced = (math.sqrt(statistics.mean(by_first["align"]) * statistics.mean(by_first["trl"]))
                if by_first["align"] and by_first["trl"] else math.nan)
    med_round = statistics.median(x for x in round_ratios if x == x) if any(x == x for x in round_ratios) else math.nan
    all_pairs = sum(o["clean_pairs"] for o in rounds)
    print()
    print(f"tiny Qwen2 {MODEL}, arith, batch {args.batch_size}, {args.steps} steps per run (first {args.warmup} "
          f"left out), {len(rounds)} rounds of align/TRL taking turns every {args.block} steps, "
          f"torch threads {torch.get_num_threads()}")
    print(table(
        ["side", "steps/s (pooled)", "ms/step", "steps/s per round", "step_begin..end ms (median/round)"],
        [[k, f"{pooled[k]:.3f}", f"{1000 / pooled[k]:.1f}",
          " ".join(f"{o['steps_per_s'][k]:.2f}" for o in rounds),
          " ".join(f"{o['median_step_compute_ms'][k]:.1f}" for o in rounds)] for k in ("align", "trl")],
    ))
    verdict = "met" if ratio >= GOAL else "NOT met"
    print(f"ratio align/TRL = {ratio:.3f} pooled over {all_pairs} clean block pairs (goal >= {GOAL}: {verdict}); "
          f"per round {' '.join(f'{x:.3f}' for x in round_ratios)}, median {med_round:.3f}; "
          f"align-first rounds {' '.join(f'{x:.3f}' for x in by_first['align'])}, TRL-first rounds "
          f"{' '.join(f'{x:.3f}' for x in by_first['trl'])}, order-balanced {balanced:.3f}")
    print(f"identical batches in every round: {all(o['identical_batches'] for o in rounds)}; identical logged losses: "
          f"{all(o['identical_losses'] for o in rounds)} (last: align {rounds[-1]['losses']['align'][-1]:.4f}, "
          f"TRL {rounds[-1]['losses']['trl'][-1]:.4f})")

    result = {
        "command": "python bench/sft_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {**MODEL, **vars(args), "data": "arith", "lora": {"r": 16, "alpha": 32, "dropout": args.lora_dropout,
                   "target_modules": "all-linear"}, "packing": False, "dtype": "float32"},
        "steps_per_s": pooled, "ms_per_step": {k: 1000 / v for k, v in pooled.items()},
        "ratio_align_over_trl": ratio, "ratio_per_round": round_ratios, "ratio_median_round": med_round,
        "ratio_by_first_side": by_first, "ratio_order_balanced": balanced,
        "clean_block_pairs": all_pairs, "goal": GOAL, "goal_met": ratio >= GOAL,
        "identical_batches": all(o["identical_batches"] for o in rounds),
        "identical_losses": all(o["identical_losses"] for o in rounds), "rounds": rounds,
        "wall_s": time.perf_counter() - t_start,
    }
    if args.smoke:
        only = rounds[0]
        smoke_check("sft_overhead", {
            f"{side} side: {args.steps} steps, timed blocks after the warm-up":
                only["steps_done"].get(side) == args.steps and only["blocks_per_side"] >= 1
            for side in ("align", "trl")} | {
            "both sides trained on identical batches": only["identical_batches"],
            "both sides logged a loss at step 10":
                len(only["losses"]["align"]) >= 2 and len(only["losses"]["trl"]) >= 1})
        return result
    path = write_results("sft_overhead", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
