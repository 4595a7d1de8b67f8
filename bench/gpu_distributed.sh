#!/usr/bin/env bash
# GPU check of scale-out on ONE GPU (docs/DISTRIBUTED.md): a small random model, then `align sft` 20 steps in bf16
# launched through accelerate with --accelerate-config ddp and with fsdp2 (1 process each: one GPU). Prints the mean
# step time and the peak GPU memory of each (nvidia-smi, sampled every 100 ms, CUDA context included) and exits
# non-zero if a run fails or is not completed. Needs align installed (pip install --no-deps -e .) next to torch,
# transformers, accelerate, peft, trl and datasets. Under 4 minutes on an H100.
#
#     bash bench/gpu_distributed.sh [OUT_DIR]
#     bash bench/gpu_distributed.sh --smoke [OUT_DIR]
#
# --smoke runs on CPU (no GPU needed; tests/test_bench.py runs it): the same two align commands through the same
# accelerate presets (1 process, gloo on CPU), on align's default tiny model, 2 steps of 4 rows of 64 tokens in the
# default dtype, no nvidia-smi sampling, and the same completion check of each run; it prints `smoke OK:
# gpu_distributed` and uses a temporary OUT_DIR unless one is given.
set -uo pipefail
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
if [ "$SMOKE" = 1 ]; then
  OUT=${1:-$(mktemp -d -t align-gpu-distributed-smoke.XXXXXX)}
  STEPS=2 SIZE=() TRAIN=(--batch-size 4 --max-length 64)
  export OMP_NUM_THREADS=1
else
  OUT=${1:-/tmp/align-gpu-distributed}
  STEPS=20 SIZE=(--hidden-size 512 --num-layers 4 --num-heads 8)
  TRAIN=(--batch-size 16 --max-length 256 --dtype bfloat16)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf "$OUT" && mkdir -p "$OUT"
if [ "$SMOKE" = 0 ]; then
  python -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" || exit 1
fi
align tiny-model -o "$OUT/base" "${SIZE[@]}" --seed 1 > "$OUT/base.log" 2>&1 \
  || { tail -20 "$OUT/base.log"; exit 1; }

failed=0
for preset in ddp fsdp2; do
  run="$OUT/sft-$preset"
  smi=
  if [ "$SMOKE" = 0 ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/$preset.mem" 2>/dev/null &
    smi=$!
  fi
  start=$(date +%s)
  align sft --model "$OUT/base" --data arith -o "$run" --max-steps "$STEPS" "${TRAIN[@]}" \
    --logging-steps 5 --save-steps 1000 --report-to none \
    --num-processes 1 --accelerate-config "$preset" > "$OUT/$preset.log" 2>&1
  code=$?
  if [ -n "$smi" ]; then kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null; fi
  wall=$(( $(date +%s) - start ))
  peak=$(sort -n "$OUT/$preset.mem" 2>/dev/null | tail -1)
  python - "$run" "$preset" "$code" "$wall" "${peak:-?}" "$STEPS" <<'EOF' || failed=1
import json, sys
from pathlib import Path

run, preset, code, wall, peak = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
want = int(sys.argv[6])
manifest = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
metrics = manifest.get("metrics") or {}
steps = max((m.get("step", 0) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())), default=0) \
    if (run / "metrics.jsonl").is_file() else 0  # run.json's metrics have train_runtime, not the step count
ok = code == 0 and manifest.get("status") == "completed" and steps == want and (run / "adapter").is_dir()
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
if [ "$SMOKE" = 1 ]; then
  [ "$failed" = 0 ] && echo "smoke OK: gpu_distributed" \
    || echo "smoke FAILED: gpu_distributed (a preset's run failed or is incomplete: see above)"
  [ -z "${1:-}" ] && rm -rf "$OUT"
fi
exit $failed
