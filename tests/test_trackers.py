"""Trackers for real (align.trackers): a 3-step run of every stage logs to TensorBoard, wandb (offline), trackio
(local) and mlflow (local file store) at once, and each tracker's own logs, read back with its own reader, hold
exactly the run's metrics.jsonl under the same names (`train/<key>`, `eval/<key>`) at the same steps — for ppo's own
loop as for the TRL stages."""

from __future__ import annotations

import glob
import json
import math
import struct
from pathlib import Path

import pytest
from helpers import HANG_S

pytest.importorskip("wandb")
pytest.importorskip("trackio")
pytest.importorskip("mlflow")

STAGES = {
    "sft": ["--model", "TINY", "--data", "arith", "--no-packing"],
    "rm": ["--model", "TINY", "--data", "arith-prefs"],
    "dpo": ["--from", "SFT", "--data", "arith-prefs", "--eval-split", "0.02", "--eval-steps", "2"],
    "grpo": ["--from", "SFT", "--data", "arith-prompts", "--reward", "closeness", "--num-generations", "4",
             "--max-completion-length", "4", "--backend", "hf"],
    "ppo": ["--from", "SFT", "--data", "arith-prompts", "--reward", "closeness", "--max-completion-length", "4",
            "--backend", "hf"],
}


@pytest.fixture(scope="module")
def logged(tiny_model, sft_run, tmp_path_factory):
    """stage -> its run directory, every stage run once with all four trackers."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("trackers")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(root / "trackio"),
           "MLFLOW_TRACKING_URI": f"file://{root / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
           "ALIGN_PROJECT": "align-test"}
    runs = {}
    for stage, args in STAGES.items():
        args = [tiny_model if a == "TINY" else str(sft_run) if a == "SFT" else a for a in args]
        run = root / stage
        done = subprocess.run([sys.executable, "-m", "align", stage, *args, "-o", str(run), "--max-steps", "3",
                               "--batch-size", "4", "--logging-steps", "1", "--report-to", "tensorboard", "wandb",
                               "trackio", "mlflow"], env=env, capture_output=True, text=True, timeout=HANG_S)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[stage] = run
    return root, runs


def expected(run: Path) -> dict[str, dict[int, float]]:
    """name -> {step: value} as every tracker should hold it, from metrics.jsonl."""
    from align.trackers import NOT_SCALARS, tracker_key

    out: dict[str, dict[int, float]] = {}
    for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        for key, value in record.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(tracker_key(key), {})[record["step"]] = float(value)
    return out


def tensorboard(run: Path, root: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def mlflow(run: Path, root: Path) -> dict[str, dict[int, float]]:
    import os

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"

    client = MlflowClient(f"file://{root / 'mlruns'}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string=f"tags.mlflow.runName = '{run.name}'")
    assert len(found) == 1
    return {key.replace("_at_", "@"): {m.step: m.value for m in client.get_metric_history(found[0].info.run_id, key)}
            for key in found[0].data.metrics}


def trackio(run: Path, root: Path) -> dict[str, dict[int, float]]:
    import os

    os.environ["TRACKIO_DIR"] = str(root / "trackio")
    import importlib

    import trackio.sqlite_storage as storage

    importlib.reload(importlib.import_module("trackio.utils"))
    importlib.reload(storage)
    out: dict[str, dict[int, float]] = {}
    for row in storage.SQLiteStorage.get_logs("align-test", run.name):
        for key, value in row.items():
            if key not in ("step", "timestamp") and isinstance(value, (int, float)) and not key.startswith("system/"):
                out.setdefault(key, {})[row["step"]] = float(value)
    return out


def wandb(run: Path, root: Path) -> dict[str, dict[int, float]]:
    """The history records of the offline run file (wandb's leveldb-style log of its own protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    [path] = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    raw, block, pos, records, pending = Path(path).read_bytes(), 32768, 7, [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if length == 0 and kind == 0:  # the rest of a block is zero padding
            pos += block - pos % block
            continue
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # a whole record, or its last fragment
            records.append(pending)
    out: dict[str, dict[int, float]] = {}
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_") and isinstance(value, (int, float)):
                    out.setdefault(key, {})[row["_step"]] = float(value)
    return out


@pytest.mark.parametrize("reader", [tensorboard, wandb, trackio, mlflow], ids=lambda r: r.__name__)
@pytest.mark.parametrize("stage", list(STAGES))
def test_every_tracker_holds_the_runs_metrics_under_one_naming(logged, stage, reader):
    root, runs = logged
    want, got = expected(runs[stage]), reader(runs[stage], root)
    assert set(got) == set(want), set(got) ^ set(want)
    for name, series in want.items():
        assert set(got[name]) == set(series), name
        for step, value in series.items():
            assert math.isclose(got[name][step], value, rel_tol=1e-5, abs_tol=1e-6) or \
                math.isnan(value) and math.isnan(got[name][step]), (name, step)


def test_the_stages_share_the_names_of_what_they_have_in_common(logged):
    _, runs = logged
    names = {stage: set(expected(run)) for stage, run in runs.items()}
    assert all("train/learning_rate" in n for n in names.values()), names
    assert "eval/loss" in names["dpo"]
    assert "train/objective/kl" in names["ppo"] and "train/kl" in names["grpo"]
