"""SFT on one GPU per adapter kind: step time, tokens/s, model FLOPs utilisation and peak GPU memory.

    python bench/gpu_sft.py                          # lora, qlora, full on a ~0.3B random Qwen2 (needs CUDA)
    python bench/gpu_sft.py --smoke                  # CPU or GPU: lora, tiny model, 8 steps of 4 rows of 128, no JSON

Setting: a random-weight Qwen2 built by align.tiny (`--size medium`: hidden 1024, 24 layers, 16 heads, MLP 2816,
vocabulary 1024 with digits split, ~0.31B parameters; saved in float32, trained in bf16 on a GPU), `align sft` on
the bundled `arith` task packed into `--max-length` (512) token rows, `--batch-size` (32) rows per step,
`--steps` (40) optimizer steps, align's defaults otherwise (LoRA r=16 all-linear; QLoRA = NF4 base + the same
LoRA; full = AdamW on every weight). Each kind runs in its own process, so the peak memory is its own.

Reported per kind, over the steps after `--warmup` (5), from the step probe of bench/_common.py (wall time from
one step's end to the next: collation, forward, backward, optimizer, callbacks):
- step time (median) and real (non-pad) tokens/s;
- MFU = tokens/s x 6 x parameters / the GPU's dense bf16 peak (`--peak-tflops`, 989 for an H100 SXM). 6N is the
  usual convention for full training; a frozen base does no weight-gradient matmuls (about 4N), so for
  LoRA/QLoRA the figure overstates the work done by up to a third. Attention FLOPs are left out (rows of 512);
- peak GPU memory: torch.cuda.max_memory_allocated after training (weights, adapter, optimizer, activations);
- trainable parameters and the final training loss.
`--size large` (hidden 2048, 16 layers, MLP 5504, ~0.8B parameters) with `--gradient-checkpointing` and a smaller
batch is the memory setting: there the weights, not the activations, decide the peak.
Results: bench/results/gpu_sft_SIZE.json (with the GPU's name).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_smoke_flag, finite, offline, smoke_check, smoke_mode, write_results  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256),
    "medium": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=2816),
    "large": dict(hidden_size=2048, num_layers=16, num_heads=16, intermediate_size=5504),
}


def count(directory: Path) -> int:
    """Parameters in the safetensors files of a model or adapter directory."""
    from safetensors import safe_open

    total = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def worker(args) -> None:
    """One kind in this process: train with the probe installed, print a JSON line."""
    offline()
    import torch
    from _common import StepProbe, install_probe, use_probe
    from transformers import AutoTokenizer

    import align

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    probe = StepProbe(pad_token_id=tokenizer.pad_token_id)
    install_probe()
    use_probe(probe)
    cuda = torch.cuda.is_available()
    run = align.sft(model=args.model, data="arith", adapter=args.kinds, output=args.output, max_steps=args.steps,
                    batch_size=args.batch_size, max_length=args.max_length, lr=2e-4 if args.kinds == "full" else 2e-3,
                    logging_steps=10, save_steps=10_000, tensorboard=False, seed=0,
                    gradient_checkpointing=args.gradient_checkpointing)
    steady = probe.steady(warmup=args.warmup)
    manifest = json.loads((Path(run) / "run.json").read_text())
    params = count(Path(args.model))
    flops = steady["real_tokens_per_s"] * 6 * params
    print("RESULT " + json.dumps({
        "kind": args.kinds,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "parameters": params,
        "trainable": count(Path(run) / ("model" if args.kinds == "full" else "adapter")),
        "median_step_ms": steady["median_step_wall_ms"],
        "real_tokens_per_s": steady["real_tokens_per_s"],
        "padding_fraction": steady["padding_fraction"],
        "mfu_6n": flops / (args.peak_tflops * 1e12) if cuda else None,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "final_loss": manifest["metrics"].get("train_loss"),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="lora,qlora,full")
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    add_smoke_flag(parser, "runs on CPU: --kinds lora --size tiny --steps 8, warm-up 2, 4 rows of 128 tokens")
    args = parser.parse_args()
    if args.model:
        return worker(args)
    if smoke_mode(args.smoke):
        args.kinds, args.size, args.steps, args.warmup, args.batch_size, args.max_length = "lora", "tiny", 8, 2, 4, 128
    offline()
    from align.tiny import build_tiny_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model", split_digits=True, max_position_embeddings=args.max_length,
                                 **SIZES[args.size])
        for kind in args.kinds.split(","):
            cmd = [sys.executable, __file__, "--kinds", kind, "--model", str(model), "--output", f"{tmp}/{kind}",
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--peak-tflops", str(args.peak_tflops),
                   *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                print(f"{kind}: failed (exit {done.returncode})\n{done.stderr[-3000:]}", flush=True)
                results.append({"kind": kind, "failed": done.returncode, "stderr": done.stderr[-3000:]})
                continue
            result = json.loads(lines[-1].removeprefix("RESULT "))
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.smoke:
        return smoke_check("gpu_sft", {"a result per kind": len(results) == len(args.kinds.split(","))} | {
            f"{r['kind']}: trained with step times, tokens/s and a loss": (
                "failed" not in r and r["real_tokens_per_s"] > 0 and finite(r["median_step_ms"], r["final_loss"]))
            for r in results})
    write_results(f"gpu_sft_{args.size}", {"args": vars(args), "results": results})
    if any("failed" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
