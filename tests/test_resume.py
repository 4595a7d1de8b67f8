"""Interrupted runs resume exactly: kill -9 after a checkpoint, or SIGTERM / SIGINT at any step (the stage saves a
checkpoint of that step and exits 143 / 130), then `--resume` — the final adapter equals an uninterrupted run's
(every tensor, 1e-5) and every step is logged once. grpo runs two iterations per batch of completions, so its
checkpoint-3 falls inside a batch (the buffered completions are restored); distill samples its completions again
after resuming, from the restored RNG state; kto's rows are shuffled once with --seed, the same order again on resuming
(kto, orpo and simpo read pairs from the same bundled file). ppo's own loop is tested the same way in
test_ppo.py.

Only the run that is killed or signalled is a process of its own; the uninterrupted runs and the resumed ones run in
the test's process (helpers.run_in_process), which spares a Python start-up per run."""

from __future__ import annotations

import json
import re
import signal
import sys

import pytest
from helpers import kill_at_checkpoint, max_adapter_difference, run_in_process, signal_after_step

STEPS = 8
STAGES = {
    "sft": ["--data", "arith", "--batch-size", "4", "--no-packing"],
    "rm": ["--data", "arith-prefs", "--batch-size", "8"],
    "dpo": ["--data", "arith-prefs", "--batch-size", "8", "--eval-split", "0.02", "--eval-steps", "4",
            "--eval-batch-size", "20"],
    "grpo": ["--data", "arith-prompts", "--reward", "closeness", "--batch-size", "8", "--num-generations", "4",
             "--max-completion-length", "6", "--backend", "hf", "--num-iterations", "2"],  # checkpoint-3: mid-batch
    "distill": ["--data", "arith-prompts", "--batch-size", "8", "--max-completion-length", "6"],
    "kto": ["--data", "arith-prefs", "--batch-size", "8"],  # pairs split into rows, shuffled once with --seed
    "orpo": ["--data", "arith-prefs", "--batch-size", "8"],
    "simpo": ["--data", "arith-prefs", "--batch-size", "8"],
}


@pytest.fixture(scope="module")
def command(tiny_model, sft_run):
    """stage, run -> the command line of a short run of that stage (sft from the tiny model, the others from sft)."""
    def make(stage: str, run) -> list[str]:
        start = {"sft": ["--model", tiny_model], "distill": ["--model", tiny_model, "--teacher", str(sft_run)]}.get(
            stage, ["--from", str(sft_run)])  # distill: a fresh student on the base, taught by sft
        return [sys.executable, "-m", "align", stage, *start, "--output", str(run), "--max-steps", str(STEPS),
                "--save-steps", "3", "--logging-steps", "1", "--no-tensorboard", *STAGES[stage]]

    return make


@pytest.fixture(scope="module")
def straight(command, tmp_path_factory):
    """stage -> an uninterrupted run of it (made once per module)."""
    runs = {}

    def get(stage: str):
        if stage not in runs:
            run = tmp_path_factory.mktemp("straight") / stage
            run_in_process(command(stage, run))
            runs[stage] = run
        return runs[stage]

    return get


def resume_and_compare(command, stage: str, run, straight_run) -> None:
    run_in_process([*command(stage, run), "--resume"])
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["resumed_at"]) == 1
    steps = [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == list(range(1, STEPS + 1)), "each step logged once: before the interruption, then after resuming"
    evals = [[m["step"] for m in map(json.loads, (r / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in m]
             for r in (run, straight_run)]
    assert evals[0] == evals[1], "no evaluation repeated on resuming"
    assert max_adapter_difference(run, straight_run) <= 1e-5


@pytest.mark.parametrize("stage", ["dpo", "grpo", *(pytest.param(s, marks=pytest.mark.slow)  # slow suite (CI)
                                                     for s in ["rm", "distill", "kto", "orpo", "simpo"])])
def test_killed_stage_resumes_exactly(command, straight, tmp_path, stage):
    run = tmp_path / stage
    kill_at_checkpoint(command(stage, run), run, 3, lost=2)  # two steps past it are lost
    resume_and_compare(command, stage, run, straight(stage))


@pytest.mark.parametrize(("stage", "sig"), [("sft", signal.SIGINT), ("grpo", signal.SIGTERM)], ids=["sft-SIGINT",
                                                                                                  "grpo-SIGTERM"])
def test_signal_saves_the_current_step_and_resume_loses_nothing(command, straight, tmp_path, stage, sig):
    run = tmp_path / stage
    code, err = signal_after_step(command(stage, run), run, 1, sig)
    assert code == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    found = re.search(rf"align {stage}: interrupted \({sig.name}\) at step (\d+); checkpoint saved to (\S+); "
                      r"continue with --resume", err)
    assert found, err[-3000:]
    step = int(found.group(1))
    assert 1 < step < STEPS and found.group(2) == str(run / "checkpoints" / f"checkpoint-{step}")
    assert json.loads((run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())[
        "global_step"] == step
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    resume_and_compare(command, stage, run, straight(stage))


def test_a_second_signal_waits_while_saving_and_stops_at_once_otherwise(tmp_path):
    import os

    from align.interrupt import GracefulStop, Interrupted

    # SIGINT's handler before: Python's default, or SIG_IGN when pytest was started in the background (`pytest &`)
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:  # real signals to this process
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested  # the first one only asks to stop after the step
        stop.saving = True
        os.kill(os.getpid(), signal.SIGINT)  # ignored while the checkpoint is written
        with pytest.raises(Interrupted) as raised:
            stop.raise_if_stopped(7, tmp_path / "checkpoint-7")
    assert raised.value.exit_code == 130 and str(raised.value) == (
        f"interrupted (SIGINT) at step 7; checkpoint saved to {tmp_path / 'checkpoint-7'}; continue with --resume")
    with GracefulStop() as stop, pytest.raises(Interrupted) as raised:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # before the step has finished: stop now, without a checkpoint
    assert raised.value.exit_code == 143 and raised.value.checkpoint is None
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
