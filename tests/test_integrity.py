"""Run-directory integrity (issue #19; align.integrity): one writer per directory (a real second process against a
held lock, then kill -9 and the lock is free), artifacts and base weights verified on reuse (files really deleted,
truncated, replaced; a base really rebuilt with another seed), sealed checkpoints with fallback on --resume (the
resumed run still equals the straight one), and outputs that never destroy an input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import HANG_S, _paused, kill_at_checkpoint, max_adapter_difference, run_in_process

import align
from align import integrity
from align.runs import verify_run

FAST = ["--batch-size", "2", "--no-packing", "--no-tensorboard", "--logging-steps", "1"]
ADAPTER = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def done(tiny_model, tmp_path_factory) -> Path:
    """A completed 2-step sft run (read-only for the tests: they copy it before changing anything)."""
    return align.sft(model=tiny_model, data="arith", output=tmp_path_factory.mktemp("integrity") / "sft", max_steps=2,
                     save_steps=1, batch_size=2, packing=False, tensorboard=False)


def sft_command(model, run, *extra) -> list[str]:
    return [sys.executable, "-m", "align", "sft", "--model", str(model), "--data", "arith", "--output", str(run),
            *FAST, *extra]


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)  # copy2: sizes and mtimes kept, so the copy verifies as the original does
    return dest


def flip_byte(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- one writer ----------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder_and_kill_9_frees_the_lock(tiny_model, tmp_path, cli):
    run = tmp_path / "sft"
    first, marker = _paused(sft_command(tiny_model, run, "--max-steps", "2"), run, 0)  # waits before its first step
    try:
        second = subprocess.run(sft_command(tiny_model, run, "--max-steps", "2", "--overwrite"), capture_output=True,
                                text=True, timeout=HANG_S)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"--output {run} is being written by another align process (pid {first.pid}" in second.stderr
        assert "align sft" in second.stderr and "Traceback" not in second.stderr
        # a pipeline with a stage in that directory is refused before anything runs
        pipeline = tmp_path / "pipe.yaml"
        pipeline.write_text(yaml.safe_dump({"model": tiny_model, "output": str(tmp_path), "stages": [
            {"name": "sft", "kind": "sft", "data": "arith", "max_steps": 1}]}))
        code, _, err = cli("run", pipeline)
        assert code == 2 and f"pid {first.pid}" in err, err
        assert json.loads((run / "run.json").read_text())["status"] == "running"  # nobody touched the first's run
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        marker.unlink(missing_ok=True)
    with integrity.writer_scope():  # the kernel released the dead process's lock: no stale lock
        integrity.lock(run, "test")
        assert str(run.resolve()) in integrity.held()
    assert str(run.resolve()) not in integrity.held()


def test_a_running_pipeline_holds_its_output_directory(tiny_model, tmp_path):
    out = tmp_path / "pipe"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom align import integrity\n"
                               f"integrity.lock({str(out)!r}, 'x')\nprint('locked', flush=True)\nsys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(align.errors.AlignError, match=rf"pipeline output {out} is being written by another align "
                                                          rf"process \(pid {holder.pid}"):
            align.run({"model": tiny_model, "output": str(out),
                       "stages": [{"name": "sft", "kind": "sft", "data": "arith", "max_steps": 1}]})
        with pytest.raises(align.errors.AlignError, match=f"pipeline directory {out} is being written"):
            align.sft(model=tiny_model, data="arith", output=out / "sft", max_steps=1)
    finally:
        holder.communicate("")
    with integrity.writer_scope():  # the holder ended (without releasing): its lock went with it
        integrity.lock(out, "test")
    assert not integrity.lock_file(out).exists()  # a lock file is removed when its holder releases it


# -- verified artifacts -------------------------------------------------------------------------------------------
def test_a_completed_run_records_every_artifact_and_its_base(done, tiny_model):
    manifest = json.loads((done / "run.json").read_text())
    assert ADAPTER in manifest["artifacts"] and "adapter/adapter_config.json" in manifest["artifacts"]
    assert manifest["artifacts"][ADAPTER]["size"] == (done / ADAPTER).stat().st_size
    assert set(manifest["base_files"]) == {"config.json", "model.safetensors"}
    sealed = sorted((done / "checkpoints").glob("checkpoint-*/" + integrity.SEAL))
    assert sealed and "optimizer.pt" in json.loads(sealed[-1].read_text())["files"]
    assert verify_run(done, manifest) == []


@pytest.mark.parametrize("damage", ["deleted", "truncated", "replaced", "same size and mtime"])
def test_reuse_of_a_changed_run_is_refused_naming_the_file(done, tmp_path, cli, damage, monkeypatch):
    run = copy_run(done, tmp_path / "run")
    target = run / ADAPTER
    stat = target.stat()
    if damage == "deleted":
        target.unlink()
    elif damage == "truncated":
        os.truncate(target, stat.st_size // 2)
    else:
        flip_byte(target)
        if damage == "same size and mtime":  # only a full re-hash can tell
            os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            assert verify_run(run, json.loads((run / "run.json").read_text())) == []
            monkeypatch.setenv(integrity.VERIFY_ENV, "full")
    for command in (["generate", run, "--prompt", "hi"], ["dpo", "--from", run, "--data", "arith-prefs", "-o",
                                                          tmp_path / "dpo"], ["merge", run, "-o", tmp_path / "merged"]):
        code, _, err = cli(*command)
        assert code == 2, (command, err)
        assert str(target) in err and "Traceback" not in err, err
    assert not (tmp_path / "dpo").exists() and not (tmp_path / "merged").exists()


def test_a_base_rebuilt_with_another_seed_is_refused(tmp_path, cli):
    from align.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base", seed=0)
    run = align.sft(model=str(base), data="arith", output=tmp_path / "sft", max_steps=1, batch_size=2, packing=False,
                    tensorboard=False)
    config = (base / "config.json").read_bytes()
    shutil.rmtree(base)
    build_tiny_model(tmp_path / "base", seed=1)
    assert (base / "config.json").read_bytes() == config  # the same config: only the weights tell them apart
    for command in (["generate", run, "--prompt", "hi"], ["sft", "--from", run, "--data", "arith", "-o",
                                                          tmp_path / "child"]):
        code, _, err = cli(*command)
        assert code == 2, err
        assert f"the base model at {base.resolve()} (with the adapters merged into it) changed since {run} was trained on it" in err, err
        assert str(base.resolve() / "model.safetensors") in err


def test_resume_refuses_a_base_rebuilt_since_the_run_started(tmp_path, cli):
    from align.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base", seed=0)
    run = tmp_path / "sft"
    command = sft_command(base, run, "--max-steps", "2")
    started, marker = _paused(command, run, 0)  # run.json records the base, then kill -9 before the first step
    os.kill(started.pid, signal.SIGKILL)
    started.wait()
    marker.unlink(missing_ok=True)
    shutil.rmtree(base)
    build_tiny_model(tmp_path / "base", seed=1)
    code, _, err = cli(*command[3:], "--resume")
    assert code == 2 and f"--resume: the base model {base.resolve()} of {run} changed since the run started" in err, err
    assert str(base.resolve() / "model.safetensors") in err


def test_a_child_checks_the_adapter_merged_into_its_base(done, tmp_path, cli):
    parent = copy_run(done, tmp_path / "parent")
    child = align.sft(from_run=str(parent), handoff="merge", data="arith", output=tmp_path / "child", max_steps=1,
                      batch_size=2, packing=False, tensorboard=False)
    assert cli("generate", child, "--prompt", "hi", "--max-new-tokens", "2")[0] == 0
    flip_byte(parent / ADAPTER)  # the parent's adapter is part of the child's base
    code, _, err = cli("generate", child, "--prompt", "hi")
    assert code == 2 and str((parent / ADAPTER).resolve()) in err, err


def test_a_run_from_an_older_align_loads_with_a_warning(done, tmp_path, caplog):
    run = copy_run(done, tmp_path / "old")
    manifest = json.loads((run / "run.json").read_text())
    for key in ("artifacts", "base_files"):
        manifest.pop(key)
    (run / "run.json").write_text(json.dumps(manifest))
    from align.handoff import resolve_parent

    with caplog.at_level("WARNING"):
        resolve_parent(run, "dpo")
        resolve_parent(run, "dpo")
    assert [r.getMessage() for r in caplog.records].count(
        f"{run} was written by an older align that did not record its weights' sha256; they are used unverified.") == 1


def test_pipeline_refuses_a_stage_whose_artifacts_changed_and_force_rebuilds_it(tiny_model, tmp_path, cli):
    out = tmp_path / "pipe"
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(yaml.safe_dump({"model": tiny_model, "output": str(out), "stages": [
        {"name": "sft", "kind": "sft", "data": "arith", "max_steps": 1, "batch_size": 2, "packing": False,
         "tensorboard": False}]}))
    assert cli("run", pipeline)[0] == 0
    target = out / "sft" / ADAPTER
    original = target.read_bytes()
    for damage in ("replaced", "truncated", "deleted"):
        if damage == "replaced":
            flip_byte(target)
        elif damage == "truncated":
            os.truncate(target, 100)
        else:
            target.unlink()
        code, _, err = cli("run", pipeline)
        assert code == 2 and str(target) in err and "--force" in err, err
        target.write_bytes(original)  # restored (a new mtime, the same bytes): it verifies again
        code, out_text, err = cli("run", pipeline, "--dry-run")
        assert code == 0 and "skip" in out_text, err
    target.unlink()
    code, _, err = cli("run", pipeline, "--force")
    assert code == 0, err
    assert target.is_file() and verify_run(out / "sft", json.loads((out / "sft" / "run.json").read_text())) == []
    code, out_text, _ = cli("run", pipeline, "--dry-run")
    assert code == 0 and "skip" in out_text


# -- sealed checkpoints -------------------------------------------------------------------------------------------
STEPS = ["--max-steps", "4", "--save-steps", "1"]


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "sft"
    run_in_process(sft_command(tiny_model, run, *STEPS))  # only the killed runs need processes of their own
    return run


@pytest.mark.parametrize("damage", ["optimizer.pt removed", "adapter truncated"])
def test_resume_falls_back_to_the_previous_sealed_checkpoint(tiny_model, straight, tmp_path, cli, damage):
    run = tmp_path / "sft"
    command = sft_command(tiny_model, run, *STEPS)
    kill_at_checkpoint(command, run, 2)  # checkpoint-1 and checkpoint-2 sealed, then kill -9
    newest, previous = (run / "checkpoints" / f"checkpoint-{n}" for n in (2, 1))
    if damage == "optimizer.pt removed":
        (newest / "optimizer.pt").unlink()
        broken = newest / "optimizer.pt"
    else:
        os.truncate(newest / "adapter_model.safetensors", 64)
        broken = newest / "adapter_model.safetensors"
        # with the previous one broken too, nothing verifies: --resume refuses and names both
        saved = (previous / "adapter_model.safetensors").read_bytes()
        flip_byte(previous / "adapter_model.safetensors")
        code, _, refused = cli(*command[3:], "--resume")
        assert code == 2, refused[-3000:]
        assert f"--resume: no checkpoint in {run / 'checkpoints'} verifies" in refused
        assert str(broken) in refused and str(previous / "adapter_model.safetensors") in refused
        (previous / "adapter_model.safetensors").write_bytes(saved)
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"using checkpoint-1; skipped the newer checkpoint-2: {broken}" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    steps = [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == [1, 2, 3, 4]
    assert max_adapter_difference(run, straight) <= 1e-5
    # --save-total-limit 2 (the default) still rotates, after each new checkpoint is sealed
    kept = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-3", "checkpoint-4"]
    assert all(integrity.checkpoint_problem(run / "checkpoints" / name) is None for name in kept)


# -- sources are never destroyed -----------------------------------------------------------------------------------
def test_an_output_over_an_input_is_refused_even_with_overwrite(done, tiny_model, tmp_path, cli):
    from align.data.samples import bundled_path

    before = {p: p.stat().st_mtime_ns for p in done.rglob("*")}
    link = tmp_path / "link"
    link.symlink_to(done)
    cases = [
        (["dpo", "--from", done, "--data", "arith-prefs", "-o", done, "--overwrite"], f"--output {done} is --from"),
        (["dpo", "--from", done, "--data", "arith-prefs", "-o", link, "--overwrite"], f"--output {link} is --from"),
        (["dpo", "--from", done, "--data", "arith-prefs", "-o", done.parent, "--overwrite"], "contains --from"),
        (["merge", done, "-o", done, "--overwrite"], f"--output {done} is the run {done}"),
        (["sft", "--model", tiny_model, "--data", "arith", "-o", Path(tiny_model) / "out", "--overwrite"],
         "lies inside --model"),
        (["sft", "--from", done, "--data", "arith", "-o", Path(tiny_model) / "x"], "lies inside the base model"),
    ]
    data = tmp_path / "held.jsonl"
    shutil.copy(bundled_path("arith-prompts-eval"), data)
    cases += [(["eval", done, "--data", data, "--output", data], f"--output {data} is --data {data}"),
              (["eval", done, "--data", data, "--output", done / ADAPTER], "lies inside the evaluated"),
              (["rm", "score", done, "--data", data, "-o", data], f"--output {data} is --data {data}")]
    for command, expected in cases:
        code, _, err = cli(*command)
        assert code == 2 and expected in err, (command, err)
        assert "--overwrite" not in err, err
    assert {p: p.stat().st_mtime_ns for p in done.rglob("*")} == before
    assert data.read_bytes() == Path(bundled_path("arith-prompts-eval")).read_bytes()
    assert not (Path(tiny_model) / "out").exists()
