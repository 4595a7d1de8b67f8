#!/usr/bin/env bash
# GPU check of scale-out on ONE GPU (docs/DISTRIBUTED.md): a small random model, then `align sft` 20 steps in bf16
# launched through accelerate with --accelerate-config ddp and with fsdp2 (1 process each: one GPU). Prints the mean
# step time and the peak GPU memory of each (nvidia-smi, sampled every 100 ms, CUDA context included) and exits
# non-zero if a run fails or is not completed. Needs align installed (pip install --no-deps -e .) next to torch,
# transformers, accelerate, peft, trl and datasets. Under 4 minutes on an H100.
#
#     bash bench/gpu_distributed.sh [OUT_DIR]
set -uo pipefail
OUT=${1:-/tmp/align-gpu-distributed}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf "$OUT" && mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" || exit 1
align tiny-model -o "$OUT/base" --hidden-size 512 --num-layers 4 --num-heads 8 --seed 1 > "$OUT/base.log" 2>&1 \
  || { tail -20 "$OUT/base.log"; exit 1; }

failed=0
for preset in ddp fsdp2; do
  run="$OUT/sft-$preset"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/$preset.mem" 2>/dev/null &
  smi=$!
  start=$(date +%s)
  align sft --model "$OUT/base" --data arith -o "$run" --max-steps 20 --batch-size 16 --max-length 256 \
    --logging-steps 5 --save-steps 1000 --dtype bfloat16 --report-to none \
    --num-processes 1 --accelerate-config "$preset" > "$OUT/$preset.log" 2>&1
  code=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  wall=$(( $(date +%s) - start ))
  peak=$(sort -n "$OUT/$preset.mem" 2>/dev/null | tail -1)
  python - "$run" "$preset" "$code" "$wall" "${peak:-?}" <<'EOF' || failed=1
import json, sys
from pathlib import Path

run, preset, code, wall, peak = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
manifest = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
metrics = manifest.get("metrics") or {}
steps = max((m.get("step", 0) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())), default=0) \
    if (run / "metrics.jsonl").is_file() else 0  # run.json's metrics have train_runtime, not the step count
ok = code == 0 and manifest.get("status") == "completed" and steps == 20 and (run / "adapter").is_dir()
losses = [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m] \
    if (run / "metrics.jsonl").is_file() else []
step_time = metrics.get("train_runtime", float("nan")) / max(steps, 1)
print(f"{preset:6s} {'OK  ' if ok else 'FAIL'} exit={code} steps={steps} step_time={step_time:.3f}s "
      f"peak_gpu_mem={peak}MiB wall={wall}s loss {losses[0] if losses else float('nan'):.3f} -> "
      f"{losses[-1] if losses else float('nan'):.3f}")
sys.exit(0 if ok else 1)
EOF
  [ "$code" -eq 0 ] || { echo "--- $preset log (tail) ---"; tail -30 "$OUT/$preset.log"; failed=1; }
done
exit $failed
