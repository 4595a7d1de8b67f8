"""Guarded reading of the files users give (and runs leave behind), and file-system errors as user errors.

Every read of a user's text file goes through `read_text` (bytes that are not UTF-8: the file and byte offset);
JSON files align writes and reads back (run.json, pipeline.json) through `read_json`; JSON-lines logs through
`read_jsonl`, which can skip the torn last line of a file still being written (a run in progress). `os_error_message`
turns an OSError a user can fix (a full disk, a read-only file system, a path of the wrong kind) into one message
naming the path and, for a full disk, the file system and its free space; the CLI prints it (exit 2) instead of a
traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

from align.errors import AlignError

# OSErrors that describe the user's disk or paths, not a bug: reported as one message (exit 2)
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
               errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTEMPTY}


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file; AlignError naming the file and the first byte that is not UTF-8, or an OS error."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AlignError(f"{path}: cannot read it ({e.strerror}).") from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Excel, Notepad) is dropped
    except UnicodeDecodeError as e:
        raise AlignError(not_utf8(path, data, e)) from None


def not_utf8(path: str | Path, data: bytes, error: UnicodeDecodeError) -> str:
    """Message for a file that is not UTF-8: where (line and byte offset), which byte, and the fix."""
    line = data.count(b"\n", 0, error.start) + 1
    return (f"{path}:{line}: not UTF-8 text (byte {error.start}: 0x{data[error.start]:02x}). Save the file as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8 FILE > NEW`).")


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON document align wrote; AlignError naming file:line when it is truncated or corrupt."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AlignError(f"{path}:{e.lineno}: corrupt {what} ({e.msg} at column {e.colno}); it was cut short or "
                         "edited. Restore it, or delete it to start that directory over.") from None


def read_jsonl(path: str | Path, *, torn_tail_ok: bool = False) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file. A bad line is an AlignError naming file:line — except, with `torn_tail_ok`,
    a last line without its newline (a writer still appending, or killed mid-line), which is skipped."""
    path = Path(path)
    text = read_text(path)
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_tail_ok and number == len(lines):  # no newline after it: the line is not finished
                continue
            raise AlignError(f"{path}:{number}: corrupt line ({e.msg} at column {e.colno}). Delete or repair that "
                             "line.") from None
        if not isinstance(record, dict):
            raise AlignError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}.")
        out.append(record)
    return out


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system that holds `path` (or would hold it)."""
    p = Path(os.path.abspath(path))
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def as_os_error(e: BaseException) -> OSError | None:
    """`e` as an OSError: itself, or a library's wrapper that names the OS error only in its text (safetensors:
    "I/O error: No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e
    match = re.search(r"\(os error (\d+)\)", str(e))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def os_error_message(e: BaseException, where: str | Path | None = None) -> str | None:
    """A user's message for an OSError about their disk or paths (None for other errors); `where` names the path
    when the error does not (the command's output)."""
    e = as_os_error(e)
    if e is None or e.errno not in USER_ERRNOS:
        return None
    where = e.filename or where or "?"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        disk = mount_point(where) if where != "?" else None
        free = ""
        if disk is not None:
            stat = os.statvfs(disk)
            free = f" (file system {disk}: {_size(stat.f_bavail * stat.f_frsize)} free of " \
                   f"{_size(stat.f_blocks * stat.f_frsize)})"
        return (f"{e.strerror} writing {where}{free}. Free space there, or choose an output on another disk; a run "
                "that was training is marked failed (continue it with --resume once there is room).")
    if e.errno == errno.EROFS:
        return f"{where}: the file system is read-only. Choose a writable output location."
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied ({e.strerror}). Choose a path you may write, or fix its permissions."
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENOTEMPTY):
        other = f" -> {e.filename2}" if e.filename2 else ""
        return (f"{where}{other}: {e.strerror}. A path of the wrong kind is in the way (a file where a directory "
                "goes, or the reverse); move it or choose another path.")
    if e.errno == errno.ELOOP:
        return f"{where}: too many levels of symbolic links. Fix the link or choose another path."
    return f"{where}: {e.strerror}."


def output_file_problem(path: str | Path, flag: str = "--output") -> str | None:
    """Why a file cannot be written at `path` (a directory there, a file or dangling link among its parents), or
    None."""
    p = Path(path)
    if p.is_dir():
        return f"{flag} {p} is a directory; give a file path (e.g. {p / 'out.json'})."
    problem = output_path_problem(p.parent, flag)
    return problem.replace(f"{flag} {p.parent}", f"{flag} {p}: {p.parent}", 1) if problem else None


def output_path_problem(path: str | Path, flag: str = "--output") -> str | None:
    """Why `path` cannot be created as an output directory (a file, a dangling link, a file among its parents), or
    None."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        return f"{flag} {p} is a symbolic link to {os.readlink(p)}, which does not exist. Remove the link or " \
               "choose another path."
    if p.exists() and not p.is_dir():
        return f"{flag} {p} is a file, not a directory. Choose another output path."
    for parent in p.absolute().parents:
        if parent.is_symlink() and not parent.exists():
            return f"{flag} {p}: {parent} is a symbolic link to {os.readlink(parent)}, which does not exist."
        if parent.exists():
            if not parent.is_dir():
                return f"{flag} {p}: {parent} is a file, so nothing can be created under it. Choose another path."
            break
    return None
