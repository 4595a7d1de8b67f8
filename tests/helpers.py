"""Test helpers: recompute a model's loss on examples exactly as SFT defines it (assistant tokens only); stop a
training subprocess at a step of the test's choosing and kill or signal it there; run the same command line in the
test's own process; compare adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from align.data.chat import encode_example

# How long a test waits for a subprocess before calling it hung: a guard against hangs, never a verdict on speed, so
# it is generous enough for a 2-core machine loaded by other jobs (a 4-step vLLM run took over 15 min at load 14).
HANG_S = float(os.environ.get("ALIGN_TEST_HANG_S", 3600))


def completion_loss(model, tokenizer, examples: list[dict]) -> float:
    """Mean NLL over assistant tokens of `examples`, in one padded batch."""
    encoded = [encode_example(ex, tokenizer) for ex in examples]
    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor([t if m else -100 for t, m in zip(e["input_ids"], e["assistant_masks"], strict=False)])
        mask[i, :n] = 1
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


def kill_at_checkpoint(cmd: list[str], run: Path, step: int, lost: int = 0) -> None:
    """Run `cmd` (a training command writing `run`) until `lost` steps past its complete checkpoint-`step`, kill -9
    it there, and check that the run is left `running`. The stage itself stops at that step and waits
    (align.interrupt.pause_point), so the verdict does not depend on how fast the machine is."""
    proc, marker = _paused(cmd, run, step + lost)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    marker.unlink(missing_ok=True)
    assert (run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "running"


def signal_after_step(cmd: list[str], run: Path, step: int, sig: int) -> tuple[int, str]:
    """Run `cmd` (a training command writing `run`) until step `step` is done, send `sig` while the stage waits there
    (before step `step` + 1), and return (exit code, stderr)."""
    proc, marker = _paused(cmd, run, step)
    try:
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        marker.unlink(missing_ok=True)
    return proc.returncode, err


def _paused(cmd: list[str], run: Path, step: int, timeout: float = 300) -> tuple[subprocess.Popen, Path]:
    """Start `cmd` with the test hook that makes its stage wait once `step` steps are done; return when it waits."""
    from align.interrupt import PAUSE_ENV

    marker = run.parent / f".{run.name}.paused"
    marker.unlink(missing_ok=True)
    env = {**os.environ, PAUSE_ENV: f"{step}:{marker}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"step {step} never reached in {timeout} s")
        time.sleep(0.02)
    return proc, marker


def run_in_process(cmd: list[str]) -> None:
    """Run a `[python, -m, align, ARGS...]` command line in this process (`align.cli.main(ARGS)`) and check that it
    succeeds. For the runs of a kill/resume test that need no process of their own (the uninterrupted run, the
    resumed one): each is a fresh stage with the same options and seed, without a Python start-up (importing torch,
    transformers and TRL costs more than a tiny run's training)."""
    from align.cli import main

    assert cmd[1:3] == ["-m", "align"], cmd
    assert main(cmd[3:]) == 0, f"align {' '.join(cmd[3:])} failed (its error is in the captured stderr)"


def max_adapter_difference(a: Path, b: Path) -> float:
    """max |a − b| over every tensor of two runs' adapters (which must hold the same tensors)."""
    from safetensors.torch import load_file

    left, right = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (a, b))
    assert left.keys() == right.keys(), set(left) ^ set(right)
    return max((left[k] - right[k]).abs().max().item() for k in left)
