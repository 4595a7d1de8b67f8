"""Trusting what is on disk: file records, verification, sealed checkpoints, one writer per directory, and outputs that
never destroy an input. align.runs applies these to run directories; nothing else implements them.

File records. A file is recorded as {size, mtime_ns, sha256}: hashed once, when it is written (a run's artifacts when
it completes, a checkpoint when it is sealed, a base model's weights when a stage starts from it). A later check
(`verify_files`) compares the size, and re-hashes only when the modification time differs from the recorded one —
so a file deleted, truncated, or replaced (a copy, a rebuild, an edit) is found, at the cost of a `stat` per file. A
file rewritten with the same size whose mtime was set back (`touch -r`, `cp -p` of other bytes) is found only with
`ALIGN_VERIFY=full` in the environment, which re-hashes every file on every check. Within one process a file is
hashed at most once per (size, mtime).

Cost (bench/hash_cost.py, 2026-12-01, commit bdd7db4, the 2-core Intel Xeon VM with SHA-NI, shared: load average
10): sha256 of a 1 GiB file takes 1.7–2.1 s (0.5–0.6 GiB/s, hashlib), the same with the page cache dropped; the size
+ mtime check of a recorded file 0.14 ms. A 7 B model in bf16 (13 GiB) would cost ~25 s of hashing once, when the run
that wrote it completes (and as much per checkpoint, with its optimizer state); verifying it on reuse costs a `stat`.
A run directory copied without its mtimes (`cp -r`, not `cp -a`) is re-hashed by every process that reuses it.

Sealed checkpoints. A checkpoint counts only once `align-seal.json` (the records of every file in it) is written, last
and atomically (`seal`). `checkpoint_problem` says what is wrong with one (not sealed, a file missing, truncated or
changed); align.runs.Run.last_checkpoint takes the newest one that verifies.

One writer. `lock(DIR)` takes an exclusive `fcntl.flock` on the sibling file `.DIR.lock` (beside the directory, not
in it: a run directory is cleared by --overwrite and a merge output replaced by a rename, which would delete a lock
inside them). The kernel releases it when the process ends, however it ends, so a lock is never stale. The holder
writes its pid, command and start time into the file; a second writer is refused (AlignError, exit 2) naming them.
Locks taken inside `writer_scope()` are released when the scope ends (the CLI, the Python API and each pipeline
stage open one); a lock this process already holds is not taken twice. Processes started by `align --num-processes`
inherit the launcher's locks through ALIGN_HELD_LOCKS (the launcher holds them while they run).

Sources. `check_not_source` refuses an output that is, contains or lies inside one of the command's inputs (symlinks
resolved), with or without --overwrite; `command_inputs` lists a command's inputs from its config.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from align.errors import AlignError

logger = logging.getLogger(__name__)

VERIFY_ENV = "ALIGN_VERIFY"  # "full": re-hash every file on every check
SEAL = "align-seal.json"
HELD_ENV = "ALIGN_HELD_LOCKS"  # the launcher's locks, for the processes it starts (os.pathsep-separated)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

Records = dict[str, dict[str, Any]]


# -- file records ----------------------------------------------------------------------------------------------
_hashed: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime_ns) -> sha256, for this process


def sha256_file(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _hashed or full_verify():
        with open(path, "rb") as fh:
            _hashed[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _hashed[key]


def record_files(root: Path, files: Iterable[Path]) -> Records:
    """{path relative to `root`: {size, mtime_ns, sha256}} for `files` (under `root`)."""
    out = {}
    for file in sorted(files):
        stat = file.stat()
        out[file.relative_to(root).as_posix()] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                                  "sha256": sha256_file(file)}
    return out


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else []


def model_files(directory: Path) -> list[Path]:
    """The files that identify a model directory's weights: its top-level weight files and config.json."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES
                                                                     or p.name == "config.json"))


def full_verify() -> bool:
    return os.environ.get(VERIFY_ENV, "").lower() == "full"


def verify_files(root: Path, records: Records) -> list[str]:
    """What differs between the files under `root` and their `records` (empty: they verify). Size first; the sha256
    when the mtime changed or under ALIGN_VERIFY=full."""
    problems = []
    for name, recorded in records.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        stat = path.stat()
        if stat.st_size != recorded["size"]:
            problems.append(f"{path} has {stat.st_size} bytes, {recorded['size']} were recorded (truncated or replaced)")
        elif (full_verify() or stat.st_mtime_ns != recorded.get("mtime_ns")) and sha256_file(path) != recorded["sha256"]:
            problems.append(f"{path} changed since it was written (its sha256 differs from the recorded one)")
    return problems


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


# -- sealed checkpoints ------------------------------------------------------------------------------------------
def seal(checkpoint: Path) -> None:
    """Record every file of a complete checkpoint in checkpoint/align-seal.json, written last and atomically."""
    records = record_files(checkpoint, [p for p in files_under(checkpoint) if p.name != SEAL])
    tmp = checkpoint / f".{SEAL}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"files": records}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, checkpoint / SEAL)


def checkpoint_problem(checkpoint: Path, require_seal: bool = True) -> str | None:
    """Why `checkpoint` cannot be resumed from (None: it can). Without `require_seal` (a run written before align
    sealed checkpoints), an unsealed checkpoint counts once its trainer_state.json, written last, is whole."""
    seal_path = checkpoint / SEAL
    if not seal_path.is_file():
        if require_seal:
            return "not sealed (its save did not finish)"
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return "incomplete (no whole trainer_state.json)"
        return None
    try:
        records = json.loads(seal_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its seal {seal_path} is unreadable"
    problems = verify_files(checkpoint, records)
    return "; ".join(problems) if problems else None


# -- one writer per directory ------------------------------------------------------------------------------------
_held: dict[str, int] = {}  # resolved directory -> descriptor of its locked file
_scopes: list[list[str]] = []


def lock_file(directory: str | Path) -> Path:
    path = Path(directory).resolve()
    return path.parent / f".{path.name}.lock" if path.name else path / ".lock"


def _holder_text(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        info = {}
    if not info:
        return "another process (it has not written its details yet)"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: {info.get('command')}"


def _try_lock(path: Path, attempts: int = 5) -> tuple[int | None, str | None]:
    """(descriptor holding the lock, None) or (None, the holder's description). A few short retries: another
    process may be probing the lock (check_unlocked) for an instant."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = _holder_text(fd)
            os.close(fd)
            attempts -= 1
            if attempts > 0:
                time.sleep(0.05)
                continue
            return None, text
        try:  # the file may have been removed by its previous holder after we opened it: lock the current one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, None
        os.close(fd)


def lock(directory: str | Path, what: str) -> None:
    """Take the one-writer lock of `directory` (see the module docstring); AlignError naming the holder if another
    process has it. `what` names the directory in the message (e.g. "--output runs/sft")."""
    from align.runs import now

    key = str(Path(directory).resolve())
    if key in _held or key in os.environ.get(HELD_ENV, "").split(os.pathsep):
        return
    path = lock_file(directory)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, holder = _try_lock(path)
    except OSError as e:
        raise AlignError(f"{what}: cannot create its lock file {path} ({e.strerror}). Choose a writable location.") from None
    if fd is None:
        raise AlignError(f"{what} is being written by another align process ({holder}). Wait for it to finish, or "
                         f"stop it; its lock ({path}) is released as soon as it ends.")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": now(),
            "command": " ".join([Path(sys.argv[0]).name or "python", *sys.argv[1:]])}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = fd
    if _scopes:
        _scopes[-1].append(key)


def check_unlocked(directory: str | Path, what: str) -> None:
    """AlignError if another process holds the lock of `directory` (this one may)."""
    key, path = str(Path(directory).resolve()), lock_file(directory)
    if key in _held or key in os.environ.get(HELD_ENV, "").split(os.pathsep) or not path.is_file():
        return
    fd, holder = _try_lock(path)
    if fd is None:
        raise AlignError(f"{what} is being written by another align process ({holder}). Wait for it to finish, or "
                         f"stop it; its lock ({path}) is released as soon as it ends.")
    _unlink_and_close(path, fd)  # a lock file left by a process that died


def release(key: str) -> None:
    fd = _held.pop(key, None)
    if fd is not None:
        _unlink_and_close(lock_file(key), fd)


def _unlink_and_close(path: Path, fd: int) -> None:
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()  # still holding it: whoever opened this file retries on the current one
    except FileNotFoundError:
        pass
    os.close(fd)


def held() -> list[str]:
    return list(_held)


@contextmanager
def writer_scope() -> Iterator[None]:
    """Locks taken inside are released when it ends (a lock held before it stays held)."""
    _scopes.append([])
    try:
        yield
    finally:
        for key in reversed(_scopes.pop()):
            release(key)


# -- sources -----------------------------------------------------------------------------------------------------
def check_not_source(output: str | Path, inputs: dict[str, str], flag: str = "--output",
                     file_output: bool = False) -> None:
    """AlignError if `output` is, contains or lies inside one of `inputs` ({label: path}; paths that do not exist
    are not inputs). A `file_output` (one file written, e.g. eval's JSON) may be a new file inside an input directory;
    never an existing one."""
    out = Path(output).resolve()
    for label, value in inputs.items():
        if not value or not Path(value).exists():
            continue
        source = Path(value).resolve()
        inside = source in out.parents and (out.exists() or not file_output)
        relation = "is" if out == source else "lies inside" if inside else \
            "contains" if out in source.parents else None
        if relation:
            raise AlignError(f"{flag} {output} {relation} {label}, an input of this command; writing there would "
                             "destroy it. Choose an output directory outside every input.")


INPUT_OPTIONS = {"model": "--model", "from_run": "--from", "reward_model": "--reward-model", "data": "--data",
                 "eval_data": "--eval-data", "config": "--config", "teacher": "--teacher", "reward": "--reward",
                 "gold_reward": "--gold-reward", "target": "the evaluated", "run": "the run", "reference": "--reference"}


def check_file_output(cfg, problems) -> None:
    """A command writing one file (--output FILE.json): never over one of its inputs (align.integrity)."""
    if getattr(cfg, "output", None):
        try:
            check_not_source(cfg.output, command_inputs(cfg), file_output=True)
        except AlignError as e:
            problems.add_error(e)


def command_inputs(cfg) -> dict[str, str]:
    """{label: path} of everything a command reads from disk (options naming files or runs, reward specs' files and
    runs, the parent run's base and merged adapters): its output may never be one of them (align.integrity)."""
    inputs = {}
    for field, flag in INPUT_OPTIONS.items():
        value = getattr(cfg, field, None)
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, str | Path) and item:
                # a reward spec's source: before its settings "(...)" and weight "@w"
                path = str(item).partition("@")[0].partition("(")[0] if field in ("reward", "gold_reward") else str(item)
                if field in ("reward", "gold_reward") and not Path(path).exists():
                    path = path.rpartition(":")[0] or path  # path/to/file.py:fn
                inputs[f"{flag} {item}"] = path
    parent = next((v for v in (getattr(cfg, f, None) for f in ("from_run", "teacher", "target", "run")) if v), None)
    if isinstance(parent, str | Path) and (Path(parent) / "run.json").is_file():
        try:
            manifest = json.loads((Path(parent) / "run.json").read_text())
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("base_model"):
            inputs[f"the base model {manifest['base_model']} of {parent}"] = str(manifest["base_model"])
        for adapter in manifest.get("merged_adapters") or []:
            inputs[f"the adapter {adapter} merged into {parent}"] = str(adapter)
    return inputs
