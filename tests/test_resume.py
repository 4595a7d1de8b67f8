"""Kill -9 mid-run and `--resume`, for the TRL-based stages other than sft (tested in test_sft.py) and ppo (tested
in test_ppo.py): every step is logged exactly once and the run completes from its last checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import kill_at_checkpoint

STAGES = {
    "rm": ["--data", "arith-prefs", "--batch-size", "8"],
    "dpo": ["--data", "arith-prefs", "--batch-size", "8"],
    "grpo": ["--data", "arith-prompts", "--reward", "closeness", "--batch-size", "8", "--num-generations", "4",
             "--max-completion-length", "6", "--backend", "hf"],
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_killed_stage_resumes_from_its_checkpoint(sft_run, tmp_path, stage):
    run = tmp_path / stage
    args = [sys.executable, "-m", "align", stage, "--from", str(sft_run), "--output", str(run), "--max-steps", "12",
            "--save-steps", "4", "--logging-steps", "1", "--no-tensorboard", *STAGES[stage]]
    kill_at_checkpoint(args, run, 4)
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["resumed_at"]) == 1
    steps = [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == list(range(1, 13)), "steps 1-4 from the killed process, 5-12 after resuming, none twice"
    assert (run / "adapter" / "adapter_config.json").is_file()
