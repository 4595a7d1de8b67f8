"""Test helpers: recompute a model's loss on examples exactly as SFT defines it (assistant tokens only); wait for a
file that a training subprocess writes, kill it at a checkpoint, or signal it after a logged step; compare adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from align.data.chat import encode_example


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


def kill_at_checkpoint(cmd: list[str], run: Path, step: int, linger: float = 0.0) -> None:
    """Start `cmd` (a training command writing `run`), kill -9 it once checkpoint-`step` is complete (after `linger`
    more seconds), and check that the run is left `running`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json", proc)
        time.sleep(linger)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert json.loads((run / "run.json").read_text())["status"] == "running"


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until `path` exists; fail if `proc` exits first or `timeout` passes."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def signal_after_step(cmd: list[str], run: Path, step: int, sig: int) -> tuple[int, str]:
    """Start `cmd` (a training command writing `run`, logging every step), send `sig` once step `step` is in
    metrics.jsonl, and return (exit code, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while max((json.loads(line).get("step", 0) for line in _lines(run / "metrics.jsonl")), default=0) < step:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, f"step {step} never logged"
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.endswith("}")]
    except FileNotFoundError:
        return []


def max_adapter_difference(a: Path, b: Path) -> float:
    """max |a − b| over every tensor of two runs' adapters (which must hold the same tensors)."""
    from safetensors.torch import load_file

    left, right = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (a, b))
    assert left.keys() == right.keys(), set(left) ^ set(right)
    return max((left[k] - right[k]).abs().max().item() for k in left)
