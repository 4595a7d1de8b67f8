"""Scale-out (align.launch): 2 CPU processes (gloo) against 1 process with the same global batch.

`--batch-size` is per process, so 2 processes × batch B/2 is the 1-process run with batch B: the same examples per
step (and, for grpo/ppo, the same completions: `--num-processes` seeds every completion by its global index). The
loss curves must agree (first loss within 1e-3, last within 5%), the run must complete with one metrics.jsonl line
per step, and only the main process writes (run.json completed, the adapter written once). Each run is a few steps
of the tiny model; the 2-process runs go through the real launcher (`align ... --num-processes 2`, and once
`python -m accelerate.commands.launch`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_S

STEPS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "align"]

# stage -> (extra arguments, the 1-process --batch-size, logged loss keys compared)
STAGES = {
    "sft": (["--data", "arith", "--no-packing", "--lora-dropout", "0", "--lr", "3e-3"], 8, ["loss"]),  # from the base
    "dpo": (["--data", "arith-prefs"], 8, ["loss"]),
    "grpo": (["--data", "arith-prompts", "--reward", "closeness(scale=100)", "--backend", "hf", "--num-generations",
              "4", "--max-completion-length", "8", "--lr", "5e-3", "--beta", "0.5"], 8, ["loss", "reward"]),
    "ppo": (["--data", "arith-prompts", "--reward", "closeness(scale=100)", "--backend", "hf",
             "--max-completion-length", "8", "--ppo-epochs", "2", "--lr", "1e-3"], 8,
            ["loss/policy_avg", "loss/value_avg", "objective/scores"]),
    # kto's KL baseline pairs each row with its batch neighbour inside one process's batch, so after the first step
    # (policy = reference: exact) it pairs other rows than one process does: equal within the 5%
    "kto": (["--data", "arith-prefs", "--lr", "5e-3"], 8, ["loss"]),
    "rm-pointwise": (["--data", str(Path(__file__).parent / "data" / "sentiment.jsonl"), "--lora-dropout", "0",
                      "--lr", "5e-3"], 8, ["loss"]),  # text/label rows: BCE
}


def command(stage: str, start: list[str], out: Path, batch: int, processes: int) -> list[str]:
    extra, _, _ = STAGES[stage]
    return [stage.split("-")[0], *start, "-o", str(out), "--max-steps", str(STEPS), "--batch-size", str(batch),
            "--logging-steps", "1", "--save-steps", "2", "--report-to", "none", "--num-processes", str(processes),
            *extra]


def curves(run: Path, keys: list[str]) -> dict[str, list[float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in lines if keys[0] in m]
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1)), "one metrics.jsonl line per step"
    return {k: [m[k] for m in logged] for k in keys}


def assert_finished_once(run: Path, processes: int) -> None:
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["config"]["num_processes"] == processes
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"partial writes left behind: {leftovers}"


def assert_same_curves(one: dict[str, list[float]], two: dict[str, list[float]]) -> None:
    for key in one:
        first, last = (one[key][0], two[key][0]), (one[key][-1], two[key][-1])
        assert abs(first[0] - first[1]) <= 1e-3, (key, one[key], two[key])
        assert abs(last[0] - last[1]) <= max(0.05 * abs(last[0]), 1e-4), (key, one[key], two[key])


@pytest.fixture
def start(tiny_model, sft_run):
    """sft starts from the tiny base (a fresh adapter without dropout: dropout masks depend on the process); the
    others from the sft run (dpo, grpo and ppo switch dropout off)."""
    return lambda stage: ["--model", tiny_model] if stage == "sft" else ["--from", str(sft_run)]


QUICK = ("sft",)  # the other stages' 2-process runs are in the slow suite (`pytest -m slow`, CI)


@pytest.mark.parametrize("stage", [s if s in QUICK else pytest.param(s, marks=pytest.mark.slow) for s in STAGES])
def test_two_processes_match_one_with_the_same_global_batch(cli, start, tmp_path, stage):
    _, batch, keys = STAGES[stage]
    code, _, err = cli(*command(stage, start(stage), tmp_path / "one", batch, 1))
    assert code == 0, err[-3000:]
    proc = subprocess.run([sys.executable, "-m", "align", *command(stage, start(stage), tmp_path / "two", batch // 2, 2)],
                          env=ENV, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines().count(str(tmp_path / "two")) == 1, "the run directory printed once"
    assert_finished_once(tmp_path / "one", 1)
    assert_finished_once(tmp_path / "two", 2)
    one, two = curves(tmp_path / "one", keys), curves(tmp_path / "two", keys)
    print(stage, "1 process:", one, "2 processes:", two)
    assert_same_curves(one, two)


@pytest.mark.slow  # 2 processes: `pytest -m slow` (CI)
def test_accelerate_launch_runs_align_as_a_module(start, tmp_path):
    """`accelerate launch [its options] -m align sft ...` (on CPU accelerate's torchrun launcher is --multi_gpu)."""
    out = tmp_path / "run"
    args = command("sft", start("sft"), out, 4, 2)
    args = args[: args.index("--num-processes")] + args[args.index("--num-processes") + 2 :]
    proc = subprocess.run([*ACCELERATE, *args], env=ENV, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_finished_once(out, 2)  # the launcher's process count is recorded
    curves(out, ["loss"])


@pytest.mark.parametrize("launcher, mistake, message", [
    ("accelerate", ["--lr", "-1"], "--lr must be positive"),  # every process validates
    ("align", ["--target-modules", "nope_proj"], "--target-modules nope_proj: not in this model"),  # seen on loading
])
def test_a_user_error_in_the_workers_is_printed_once_and_every_process_exits_2(tiny_model, tmp_path, launcher,
                                                                                mistake, message):
    args = ["sft", "--model", tiny_model, "--data", "arith", "-o", str(tmp_path / "run"), *mistake]
    argv = [*ACCELERATE, *args] if launcher == "accelerate" else \
        [sys.executable, "-m", "align", *args, "--num-processes", "2"]
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == (2 if launcher == "align" else 1), proc.stderr[-3000:]  # torchrun exits 1
    assert proc.stderr.count("align sft: error:") == 1, proc.stderr[-3000:]
    assert message in proc.stderr
    if launcher == "align":  # (accelerate's own launcher shows the ChildFailedError's traceback)
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_every_preset_parses_with_accelerates_own_loader():
    from accelerate.commands.config.config_args import load_config_from_file

    from align.launch import PRESETS, config_path

    kinds = {name: load_config_from_file(str(config_path(name))).distributed_type.value for name in PRESETS}
    assert kinds == {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}
    fsdp = load_config_from_file(str(config_path("fsdp2"))).fsdp_config
    assert fsdp["fsdp_version"] == 2


MULTI_CPU = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_machines: 1\nnum_processes: 2\n" \
            "mixed_precision: 'no'\nuse_cpu: true\n"


@pytest.mark.slow  # 2 processes: `pytest -m slow` (CI)
def test_a_users_multi_cpu_accelerate_config_runs_its_processes(start, tmp_path):
    """A MULTI_CPU config file (what `accelerate config` writes on a CPU machine) through --accelerate-config: its 2
    processes run (accelerate's own launcher would start one on a machine without GPUs; align uses torchrun)."""
    config = tmp_path / "multi_cpu.yaml"
    config.write_text(MULTI_CPU)
    out = tmp_path / "run"
    args = command("sft", start("sft"), out, 4, 2)
    args = args[: args.index("--num-processes")] + args[args.index("--num-processes") + 2 :]
    proc = subprocess.run([sys.executable, "-m", "align", *args, "--accelerate-config", str(config)], env=ENV,
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_finished_once(out, 2)


@pytest.mark.parametrize("launch", [["--num_processes", "2"],
                                    pytest.param(["--config_file", "CONFIG"], marks=pytest.mark.slow)], ids=["flag", "config"])
def test_accelerate_launch_asked_for_two_processes_never_trains_one_silently(tiny_model, tmp_path, launch):
    """Without --multi_gpu, accelerate's launcher starts ONE process on a CPU machine whatever it was asked: align
    refuses (exit 2 in the worker) saying why and how, instead of training one process as if that were asked."""
    config = tmp_path / "multi_cpu.yaml"
    config.write_text(MULTI_CPU)
    launch = [str(config) if a == "CONFIG" else a for a in launch]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "align", "sft", "--model",
                           tiny_model, "--data", "arith", "-o", str(out), "--max-steps", "1"], env=ENV,
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode != 0
    assert "`accelerate launch` was asked for 2 processes but started one" in proc.stderr, proc.stderr[-3000:]
    assert "--multi_gpu" in proc.stderr and not out.exists()
