"""Every adapter kind on one SFT setting of the demo task: what it trains, what it costs, what it learns.

    python bench/adapters.py                        # every kind, ~15 minutes on a 2-core CPU
    python bench/adapters.py --kinds lora,full --steps 20
    python bench/adapters.py --smoke                # lora and the TRL peer, 2 steps, rows of 64, no JSON

Setting (the same for every kind): the demo's tiny Qwen2 (align.tiny, hidden 128, 2 layers, digits tokenized one by
one, random weights, built in a temp dir), `align sft` on the bundled `arith` task with align's defaults (assistant
-only loss, packing into `--max-length` (256) token rows — off for prompt-learning kinds, whose virtual tokens must
precede each example), `--steps` (60) optimizer steps of `--batch-size` (8) rows (about 2 epochs of the 2000
examples), seed 0, fp32 on CPU, one torch thread.
Adapter settings are each kind's defaults (r=16, alpha=32, all-linear; 8 virtual tokens; bottleneck reduction 16).
Learning rates: 3e-3 for the weight adapters (LoRA+'s B matrices 16x that, A at half: 1.5e-3), 3e-2 for the
prompt-learning kinds (they need it), 3e-4 for full fine-tuning.

Each kind runs in its own process. Reported:
- trainable parameters, and their share of the base model's parameters;
- adapter size on disk: the weights and config of RUN/adapter (RUN/model for full), tokenizer files excluded;
- peak RSS of the process (ru_maxrss, after training);
- step time: train_runtime / steps (align's training loop, first step included; no evaluation during training);
- held-out loss: mean NLL of the assistant tokens of `arith-eval` (200 examples) under the reloaded run;
- held-out accuracy: greedy answers (8 new tokens) to `arith-prompts-eval` (100 problems), exact final number.
- num_tokens (JSON only): the trainer's own count. Not comparable across the two sides: for align's packed rows
  (rows × width, with position_ids restarting per example) TRL 1.16 counts position_ids.size(1), one row's width per
  step; for its own padding-free batches (one flattened row) that is every token. Both sides see the same data: the
  same number of steps of the same number of rows of at most `--max-length` tokens, best-fit packed.

Peer row (`--peer`, on by default): TRL's SFTTrainer as a user would write it, at its own best CPU setting for the
same data: `packing=True` (TRL's best-fit packing, padding-free) into rows of the same `--max-length`, the same
LoRA (r=16, alpha=32, dropout 0.05, all-linear), learning rate, schedule (cosine, no warmup), steps, rows per step and
seed, assistant-only loss through a copy of the tiny model's ChatML template with `{% generation %}` markers. Its
saved adapter is scored exactly like align's lora row (same held-out loss code, same generation).
Results: bench/results/adapters.json; `python docs/make_adapters.py --no-test` puts the table in docs/ADAPTERS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import TRL_TEMPLATE, add_smoke_flag, finite, offline, smoke_check, smoke_mode, write_results  # noqa: E402

LR = {"prompt": 3e-2, "prefix": 3e-2, "ptuning": 3e-2, "full": 3e-4, "loraplus": 1.5e-3}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def disk_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file() and f.name not in TOKENIZER_FILES)


def held_out_accuracy(model, tokenizer) -> float:
    from align.data.samples import bundled_path
    from align.generate import generate

    rows = [json.loads(line) for line in bundled_path("arith-prompts-eval").read_text().splitlines()]
    outs = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=8)
    last = [re.findall(r"-?\d+", o)[-1:] for o in outs]
    return sum(bool(n) and n[0] == str(r["answer"]) for n, r in zip(last, rows, strict=True)) / len(rows)


def scores(model, tokenizer) -> dict:
    """Held-out loss (arith-eval, assistant tokens) and accuracy of a loaded policy."""
    from align.data import load_examples

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import completion_loss

    examples, _, _ = load_examples("arith-eval")
    loss = sum(completion_loss(model, tokenizer, examples[i:i + 50]) for i in range(0, 200, 50)) / 4
    return dict(eval_loss=loss, accuracy=held_out_accuracy(model, tokenizer))


def trl_worker(model_dir: str, steps: int, batch_size: int, max_length: int, out: Path) -> dict:
    """What a user would write with TRL directly (LoRA, packing=True)."""
    import torch

    torch.set_num_threads(1)
    from datasets import load_dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from align.data.samples import bundled_path
    from align.models import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "chatml_generation.jinja").write_text(TRL_TEMPLATE)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(out / "checkpoints"), max_steps=steps, per_device_train_batch_size=batch_size,
        max_length=max_length, packing=True, seed=0, learning_rate=3e-3, lr_scheduler_type="cosine",
        logging_steps=50, save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to="none", assistant_only_loss=True, chat_template_path=str(out / "chatml_generation.jinja"),
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, peft_config=peft_config,
                         train_dataset=load_dataset("json", data_files=str(bundled_path("arith")), split="train"))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = trainer.train()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.save_model(str(out / "adapter"))
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total = sum(p.numel() for p in base.parameters())
    loaded = PeftModel.from_pretrained(base, str(out / "adapter"))
    return dict(kind="lora (TRL SFTTrainer, packing=True)", trainable=trainable, trainable_fraction=trainable / total,
                disk_bytes=disk_bytes(out / "adapter"), peak_rss_mib=rss, step_s=result.metrics["train_runtime"] / steps,
                train_loss=result.metrics["train_loss"], num_tokens=tokens[-1] if tokens else None, lr=3e-3,
                **scores(loaded, load_tokenizer(model_dir)))


def worker(kind: str, model: str, steps: int, batch_size: int, max_length: int, out: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    import align
    from align.handoff import build_policy, load_run_policy
    from align.stages.sft import SFTConfig

    options = dict(model=model, data="arith", adapter=kind, max_steps=steps, batch_size=batch_size, max_length=max_length,
                   lr=LR.get(kind, 3e-3), seed=0, logging_steps=50, save_steps=10_000, tensorboard=False,
                   report_to=["none"], output=str(out))
    policy = build_policy(SFTConfig.from_kwargs(**options), stage="sft")
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in align.models.load_base_model(model).parameters())
    del policy
    run = align.sft(**options)
    manifest = json.loads((run / "run.json").read_text())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loaded, tokenizer, _ = load_run_policy(run)
    tokens = [m["num_tokens"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "num_tokens" in m]
    return dict(kind=kind, trainable=trainable, trainable_fraction=trainable / base,
                disk_bytes=disk_bytes(run / ("model" if kind == "full" else "adapter")), peak_rss_mib=rss,
                step_s=manifest["metrics"]["train_runtime"] / steps, train_loss=manifest["metrics"]["train_loss"],
                num_tokens=tokens[-1] if tokens else None, lr=options["lr"], **scores(loaded, tokenizer))


def main() -> None:
    from align.adapters import ADAPTERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(ADAPTERS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--no-peer", action="store_true", help="skip the TRL SFTTrainer peer row")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    add_smoke_flag(parser, "lora and the TRL peer, 2 steps of 2 rows of 64 tokens, scored as in a full run")
    args = parser.parse_args()
    if smoke_mode(args.smoke) and not args.worker:
        args.kinds, args.steps, args.batch_size, args.max_length, args.no_peer = "lora", 2, 2, 64, False
    offline()
    if args.worker == "trl":
        print(json.dumps(trl_worker(args.model, args.steps, args.batch_size, args.max_length, Path(args.out))))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.steps, args.batch_size, args.max_length, Path(args.out))))
        return
    from align.tiny import build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="align-bench-adapters-") as tmp:
        model = str(build_tiny_model(Path(tmp) / "tiny", split_digits=True))
        for kind in args.kinds.split(",") + ([] if args.no_peer else ["trl"]):
            cmd = [sys.executable, __file__, "--worker", kind, "--model", model, "--out", str(Path(tmp) / kind),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{kind} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{kind:10s} trainable {r['trainable']:>9,} ({100 * r['trainable_fraction']:.3f}%)  disk "
                  f"{r['disk_bytes'] / 1024:8.0f} KiB  rss {r['peak_rss_mib']:5.0f} MiB  step {1000 * r['step_s']:5.0f} ms"
                  f"  eval loss {r['eval_loss']:.3f}  acc {100 * r['accuracy']:.0f}%", flush=True)
    setting = (f"tiny Qwen2 (hidden 128, 2 layers, split digits), arith, {args.steps} steps x {args.batch_size} rows of "
               f"{args.max_length} tokens (packed; prompt-learning kinds: {args.batch_size} examples), align sft "
               "defaults, seed 0, 1 torch thread")
    if args.smoke:
        expected = {kind: lambda r, kind=kind: r["kind"] == kind for kind in args.kinds.split(",")}
        expected["TRL peer"] = lambda r: r["kind"].startswith("lora (TRL")
        return smoke_check("adapters", {
            f"{name}: trained, saved and scored": any(
                match(r) and r["trainable"] > 0 and r["disk_bytes"] > 0
                and finite(r["train_loss"], r["eval_loss"], r["accuracy"], r["step_s"], r["peak_rss_mib"])
                for r in rows)
            for name, match in expected.items()})
    command = " ".join(["python bench/adapters.py", *sys.argv[1:]])
    path = write_results("adapters", {"command": command, "setting": setting, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
