"""Every adapter kind on one SFT setting of the demo task: what it trains, what it costs, what it learns.

    python bench/adapters.py                        # every kind, ~8 minutes on a 2-core CPU
    python bench/adapters.py --kinds lora,full --steps 50

Setting (the same for every kind): the demo's tiny Qwen2 (align.tiny, hidden 128, 2 layers, digits tokenized one by
one, random weights, built in a temp dir), `align sft` on the bundled `arith` task with align's defaults (assistant
-only loss, packing into 512-token rows — off for prompt-learning kinds, whose virtual tokens must precede each
example), `--steps` (150) optimizer steps of `--batch-size` (16) rows, seed 0, fp32 on CPU, one torch thread.
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

from _common import offline, write_results  # noqa: E402

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


def worker(kind: str, model: str, steps: int, batch_size: int, out: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    import align
    from align.handoff import build_policy, load_run_policy
    from align.stages.sft import SFTConfig

    options = dict(model=model, data="arith", adapter=kind, max_steps=steps, batch_size=batch_size,
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
    from align.data import load_examples

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import completion_loss

    examples, _, _ = load_examples("arith-eval")
    eval_loss = sum(completion_loss(loaded, tokenizer, examples[i:i + 50]) for i in range(0, 200, 50)) / 4
    return dict(kind=kind, trainable=trainable, trainable_fraction=trainable / base,
                disk_bytes=disk_bytes(run / ("model" if kind == "full" else "adapter")), peak_rss_mib=rss,
                step_s=manifest["metrics"]["train_runtime"] / steps, train_loss=manifest["metrics"]["train_loss"],
                eval_loss=eval_loss, accuracy=held_out_accuracy(loaded, tokenizer), lr=options["lr"])


def main() -> None:
    from align.adapters import ADAPTERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(ADAPTERS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    offline()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.steps, args.batch_size, Path(args.out))))
        return
    from align.tiny import build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="align-bench-adapters-") as tmp:
        model = str(build_tiny_model(Path(tmp) / "tiny", split_digits=True))
        for kind in args.kinds.split(","):
            cmd = [sys.executable, __file__, "--worker", kind, "--model", model, "--out", str(Path(tmp) / kind),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{kind} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{kind:10s} trainable {r['trainable']:>9,} ({100 * r['trainable_fraction']:.3f}%)  disk "
                  f"{r['disk_bytes'] / 1024:8.0f} KiB  rss {r['peak_rss_mib']:5.0f} MiB  step {1000 * r['step_s']:5.0f} ms"
                  f"  eval loss {r['eval_loss']:.3f}  acc {100 * r['accuracy']:.0f}%", flush=True)
    setting = (f"tiny Qwen2 (hidden 128, 2 layers, split digits), arith, {args.steps} steps x {args.batch_size} rows, "
               "align sft defaults, seed 0, 1 torch thread")
    command = "python bench/adapters.py" + (f" --steps {args.steps}" if args.steps != 150 else "")
    path = write_results("adapters", {"command": command, "setting": setting, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
