"""Packing vs padding in `align sft`: real (non-pad) tokens per second on a skewed length mix.

    python bench/packing.py                 # ~3 minutes on a 2-core CPU
    python bench/packing.py --examples 400  # quicker
    python bench/packing.py --smoke         # 48 examples, both sides, no results written (tests/test_bench.py)

Data: a generated "messages" jsonl (in a temp dir) of counting exercises, user "Count from 17 in steps of 3."
and assistant "17 20 23 ...", with skewed lengths: 90% of the examples are 20-60 tokens long, 10% are 400-500
tokens (uniform within each group; exact lengths are measured with the model's tokenizer and reported).
Counting is learnable, so the loss says whether each side trains properly.

Model: the tiny Qwen2 of align.tiny (hidden 256, 4 layers, 4 heads, random weights, built in a temp dir), LoRA
r=16 / alpha=32 / dropout 0.05 on all-linear, fp32 on CPU, loss on assistant tokens, max_length 512, one epoch,
same seed and learning rate on both sides. Each side therefore trains on exactly the same examples, i.e. the
same real tokens:

- packed: `align sft` default, `packing=True`: examples packed best-fit into rows of 512 tokens, each example
  attending only to itself (position_ids restart per example); `--batch-size` counts rows.
- padded: `packing=False`: batches of `--padded-batch` (16) examples padded to their longest member.

Batch sizes: the padded side takes 16 examples per step; the packed side takes as many 512-token rows as hold
about 16 examples on average (rows = 16 x mean example length / 512, rounded: 2 for the default mix), so both
take optimizer steps of about the same number of examples and real tokens, and the same learning rate suits
both. The measured examples per step are reported.

Metric: real tokens/s = non-pad input tokens of the batches / training-loop wall time, summed over the step
intervals (on_step_end of one step to on_step_end of the next: collation, forward, backward, optimizer,
logging) after the first `--warmup` steps; model loading, tokenization, packing and saving are outside. Steps
during which other processes used more than `--max-foreign-cpu` cores (from /proc/stat; on this shared 2-core
machine another busy process makes single steps take seconds) are left out; a run with fewer than half of its
steps clean is repeated. Trained (assistant) tokens/s is reported too. Sanity: held-out loss (mean NLL per
assistant token, each example run on its own, unpacked) of the base model and of both trained adapters; and
the packed-trained adapter's held-out loss once more with the held-out examples packed into rows by align's
packing code, which must equal the unpacked figure if packed examples do not attend to each other.
Progress bars are off (TQDM_DISABLE=1). Results: bench/results/packing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    StepProbe,
    add_smoke_flag,
    finite,
    install_probe,
    offline,
    smoke_check,
    smoke_mode,
    table,
    use_probe,
    wait_quiet,
    write_results,
)

GOAL = 2.0
MODEL = dict(hidden_size=256, num_layers=4, num_heads=4)
MAX_LENGTH = 512


# -- data ------------------------------------------------------------------------------------------------------

def make_example(rng: random.Random, target: int, tokenizer, piece_len: dict[int, int]) -> dict:
    """A counting exercise whose chat rendering is about `target` tokens."""
    step = rng.randint(1, 9)
    start = rng.randint(0, 99)
    user = f"Count from {start} in steps of {step}."
    overhead = len(_ids(tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": ""}]))
    numbers, n, length = [], start, overhead
    while length < target:
        numbers.append(n)
        length += piece_len.setdefault(n, len(tokenizer(f" {n}", add_special_tokens=False)["input_ids"]))
        n += step
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(map(str, numbers))}]}


def _ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    return out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out


def make_dataset(n: int, seed: int, tokenizer, long_fraction: float) -> list[dict]:
    rng = random.Random(seed)
    cache: dict[int, int] = {}
    examples = []
    for _ in range(n):
        target = rng.randint(400, 500) if rng.random() < long_fraction else rng.randint(20, 60)
        examples.append(make_example(rng, target, tokenizer, cache))
    return examples


def length_stats(examples: list[dict], tokenizer, long_fraction: float) -> dict:
    n = len(examples)
    lengths = sorted(len(_ids(tokenizer, e["messages"])) for e in examples)
    return {
        "examples": n, "long_fraction_target": long_fraction, "total_tokens": sum(lengths),
        "mean": statistics.mean(lengths), "median": statistics.median(lengths),
        "p90": lengths[int(0.9 * (n - 1))], "p95": lengths[int(0.95 * (n - 1))], "max": lengths[-1],
        "min": lengths[0], "share_over_300": sum(x > 300 for x in lengths) / n,
    }


# -- training ----------------------------------------------------------------------------------------------------

def run_side(name: str, model_dir: Path, data: Path, work: Path, args, pad_id: int, batch: int) -> dict:
    """One epoch of `align sft`, packed or padded."""
    import align

    probe = StepProbe(pad_id)
    use_probe(probe)
    t0 = time.perf_counter()
    run_dir = align.sft(
        model=str(model_dir), data=str(data), output=str(work / f"run-{name}"), overwrite=True,
        packing=(name == "packed"), batch_size=batch, max_length=MAX_LENGTH, epochs=1, max_steps=-1,
        lr=args.lr, lr_scheduler="cosine", seed=args.seed, adapter="lora", lora_r=16, lora_alpha=32,
        lora_dropout=0.05, target_modules=["all-linear"], gradient_checkpointing=False, logging_steps=5,
        save_steps=10_000,
    )
    total = time.perf_counter() - t0
    use_probe(None)
    metrics = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    manifest = json.loads((Path(run_dir) / "run.json").read_text())
    out = {"batch_size": batch, "total_s": total, "train_runtime": manifest["metrics"]["train_runtime"],
           "optimizer_steps": len(probe.end), "losses": losses,
           "final_train_loss": statistics.mean(loss for _, loss in losses[-3:]),
           "epoch_real_tokens": sum(probe.real_tokens), "epoch_trained_tokens": sum(probe.trained_tokens),
           "epoch_examples": sum(probe.examples),
           "epoch_seconds": probe.end[-1] - probe.begin[0],
           # what the run's metrics.jsonl says (TRL's num_tokens), to compare with the counted real tokens
           "logged_num_tokens": max((m["num_tokens"] for m in metrics if "num_tokens" in m), default=None),
           "adapter": str(Path(run_dir) / "adapter")}
    out["epoch_real_tokens_per_s"] = out["epoch_real_tokens"] / out["epoch_seconds"]
    out.update(probe.steady(args.warmup, max_foreign=args.max_foreign_cpu))
    return out


def heldout_loss(model_dir: Path, adapter: str | None, examples: list[dict], packed: bool = False) -> float:
    """Mean NLL per assistant token over `examples`: one example per forward pass (no packing, no padding), or
    with `packed`, the examples packed into rows of MAX_LENGTH by align's own packing code (pack_rows +
    PackedRowCollator, as in training). Equal results mean packed examples do not see each other."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.data.chat import encode_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ds = encode_dataset(examples, tokenizer, completion_only=True, desc="Tokenizing held-out")
    if packed:
        from align.data.packing import PackedRowCollator, pack_rows

        collate = PackedRowCollator(tokenizer.pad_token_id)
        batches = [collate([row]) for row in pack_rows(ds, MAX_LENGTH)]
    else:
        batches = [{"input_ids": torch.tensor([row["input_ids"]]), "labels": torch.tensor([row["labels"]])}
                   for row in ds]
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            ids, labels = batch["input_ids"], batch["labels"]
            extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
            # use_cache=False as in training (TRL's compute_loss sets it): with a cache, transformers does not look
            # for packed sequences in position_ids and packed examples would attend to each other
            logits = model(input_ids=ids, use_cache=False, **extra).logits[:, :-1].float()
            target = labels[:, 1:]
            mask = target != -100
            logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
            nll -= float(logp[mask].sum())
            count += int(mask.sum())
    return nll / count


# -- main --------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=800, help="training examples (one epoch on each side)")
    parser.add_argument("--heldout", type=int, default=100, help="held-out examples for the loss check")
    parser.add_argument("--long-fraction", type=float, default=0.1, help="share of 400-500-token examples")
    parser.add_argument("--padded-batch", type=int, default=16, help="examples per step, padded side")
    parser.add_argument("--packed-batch", type=int, default=None,
                        help="512-token rows per step, packed side (default: about --padded-batch examples)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=3, help="steps excluded from the steady-state rate")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-foreign-cpu", type=float, default=0.1,
                        help="leave out steps during which other processes used more than this many cores")
    parser.add_argument("--min-clean-fraction", type=float, default=0.5,
                        help="repeat a run when fewer of its steps than this were clean")
    parser.add_argument("--retries", type=int, default=3, help="repeats of a contended run (the last one is kept)")
    add_smoke_flag(parser, "48 examples, 8 held out, batch 4, 1 warm-up step, no repeats")
    args = parser.parse_args(argv)
    if smoke_mode(args.smoke):
        args.examples, args.heldout, args.padded_batch, args.warmup, args.retries = 48, 8, 4, 1, 0

    os.environ.setdefault("TQDM_DISABLE", "1")
    offline()
    import torch
    from transformers import AutoTokenizer

    from align.tiny import build_tiny_model

    install_probe()
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "tiny", **MODEL)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        examples = make_dataset(args.examples + args.heldout, args.seed, tokenizer, args.long_fraction)
        train, heldout = examples[: args.examples], examples[args.examples:]
        lengths = length_stats(train, tokenizer, args.long_fraction)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(e) + "\n" for e in train))
        mean_len = lengths["mean"]
        packed_batch = args.packed_batch or max(1, round(args.padded_batch * mean_len / MAX_LENGTH))
        print(f"data: {args.examples} train + {args.heldout} held-out examples, tokens per example: mean "
              f"{mean_len:.0f}, median {lengths['median']:.0f}, p90 {lengths['p90']}, max {lengths['max']}, "
              f"{100 * lengths['share_over_300']:.0f}% over 300; batches: padded {args.padded_batch} examples, "
              f"packed {packed_batch} rows of {MAX_LENGTH}", flush=True)

        runs: dict[str, dict] = {}
        discarded: list[dict] = []
        for name, batch in (("padded", args.padded_batch), ("packed", packed_batch)):
            for attempt in range(args.retries + 1):
                waited = wait_quiet(args.max_foreign_cpu, timeout=60)
                if waited > 3:
                    print(f"  (waited {waited:.0f} s for other processes to go quiet)", flush=True)
                out = run_side(name, model_dir, data, work, args, tokenizer.pad_token_id, batch)
                out["attempt"] = attempt
                enough = out["clean_steps"] >= args.min_clean_fraction * out["steps"]
                print(f"{name}: {out['clean_real_tokens_per_s']:.0f} real tokens/s over {out['clean_steps']} of "
                      f"{out['steps']} steps ({out['steps'] - out['clean_steps']} left out: other processes busy; "
                      f"all steps: {out['real_tokens_per_s']:.0f}), {out['examples_per_step']:.1f} examples/step, "
                      f"padding {100 * out['padding_fraction']:.0f}%, final train loss {out['final_train_loss']:.3f}"
                      + ("" if enough or attempt == args.retries else " -> too few clean steps, repeated"), flush=True)
                if enough or attempt == args.retries:
                    break
                discarded.append({"side": name, **{k: v for k, v in out.items() if k != "adapter"}})
            runs[name] = out

        print("held-out loss ...", flush=True)
        base_loss = heldout_loss(model_dir, None, heldout)
        for out in runs.values():
            out["heldout_loss"] = heldout_loss(model_dir, out["adapter"], heldout)
        packed_eval = heldout_loss(model_dir, runs["packed"]["adapter"], heldout, packed=True)
        for out in runs.values():
            out.pop("adapter")

    pk, pd = runs["packed"], runs["padded"]
    ratio = pk["clean_real_tokens_per_s"] / pd["clean_real_tokens_per_s"]
    same_tokens = pk["epoch_real_tokens"] == pd["epoch_real_tokens"]
    print()
    print(f"tiny Qwen2 {MODEL}, max_length {MAX_LENGTH}, 1 epoch of {args.examples} examples, "
          f"torch threads {torch.get_num_threads()}")
    print(table(
        ["side", "batch", "steps", "ex/step", "pad %", "real tok/s", "trained tok/s", "clean steps", "epoch s (raw)",
         "real tokens", "train loss", "held-out loss"],
        [[k, f"{v['batch_size']}{' rows' if k == 'packed' else ''}", v["optimizer_steps"],
          round(v["examples_per_step"], 1), round(100 * v["padding_fraction"], 1),
          float(v["clean_real_tokens_per_s"]), float(v["clean_trained_tokens_per_s"]),
          f"{v['clean_steps']}/{v['steps']}", round(v["epoch_seconds"], 1), v["epoch_real_tokens"],
          round(v["final_train_loss"], 3), round(v["heldout_loss"], 3)] for k, v in runs.items()],
    ))
    print(f"held-out loss of the untrained base: {base_loss:.3f}; of the packed-trained adapter with the held-out "
          f"examples packed into rows: {packed_eval:.4f} (unpacked: {pk['heldout_loss']:.4f})")
    print(f"real tokens/s packed/padded = {ratio:.2f}x (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'}); "
          f"same real tokens per epoch: {same_tokens}")

    result = {
        "command": "python bench/packing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {**MODEL, **vars(args), "max_length": MAX_LENGTH, "packed_batch": packed_batch,
                   "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
        "data": lengths, "runs": runs, "base_heldout_loss": base_loss,  # data: token lengths of the training examples
        "packed_adapter_heldout_loss_evaluated_packed": packed_eval,
        "ratio_real_tokens_per_s": ratio, "same_real_tokens": same_tokens,
        "goal": GOAL, "goal_met": ratio >= GOAL, "discarded_contended_runs": discarded,
    }
    if args.smoke:
        smoke_check("packing", {
            f"{name} side trained {args.examples} examples with a loss": (
                r["epoch_examples"] == args.examples and finite(r["final_train_loss"], r["heldout_loss"])
                and r["steps"] > 0) for name, r in runs.items()} | {
            "both sides saw the same real tokens": same_tokens,
            "packed held-out loss computed both ways": finite(packed_eval, base_loss)})
        return result
    path = write_results("packing", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
