"""What run-directory verification costs (align.integrity): sha256 of a 1 GiB file, once written (page cache warm) and
read back from disk (cache dropped when the machine allows it), and the size + mtime check that every reuse does.

    python bench/hash_cost.py [--size-gib 1] [--repeat 3]
    python bench/hash_cost.py --smoke        # 8 MiB, once; checks that a changed file is caught (writes nothing)

Writes bench/results/hash_cost.json (date, commit, machine, CPU load seen) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke_flag, finite, smoke_check, smoke_mode  # noqa: E402

from align import integrity  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "hash_cost.json"


def drop_cache(path: Path) -> bool:
    """Evict the file from the page cache (posix_fadvise); True if the kernel accepted it."""
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    add_smoke_flag(parser, "8 MiB, once")
    args = parser.parse_args()
    if smoke_mode(args.smoke):
        args.size_gib, args.repeat = 8 / 1024, 1
    size = int(args.size_gib * (1 << 30))
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = Path(tmp) / "weights.safetensors"
        with open(path, "wb") as fh:
            for _ in range(size // (1 << 24)):
                fh.write(os.urandom(1 << 24))
        records = integrity.record_files(Path(tmp), [path])
        warm, cold, check = [], [], []
        for _ in range(args.repeat):
            integrity._hashed.clear()
            warm.append(timed(lambda: integrity.sha256_file(path)))
            dropped = drop_cache(path)
            integrity._hashed.clear()
            cold.append(timed(lambda: integrity.sha256_file(path)))
            check.append(timed(lambda: integrity.verify_files(Path(tmp), records)))
        if smoke_mode():
            clean = integrity.verify_files(Path(tmp), records)
            with open(path, "r+b") as fh:
                fh.truncate(size - 1)
            smoke_check("hash_cost", {"hashes timed": finite(*warm, *cold, *check),
                                      "the written file verifies": not clean,
                                      "a truncated file is caught": bool(integrity.verify_files(Path(tmp), records))})
            return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "cpu_model": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None,
        "load_average_1min": os.getloadavg()[0], "size_bytes": size, "page_cache_dropped": dropped,
        "sha256_warm_s": sorted(warm), "sha256_cold_s": sorted(cold), "size_mtime_check_s": sorted(check),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    gib = size / (1 << 30)
    print(f"{gib:g} GiB: sha256 {min(warm):.2f} s warm ({gib / min(warm):.2f} GiB/s), {min(cold):.2f} s after "
          f"dropping the cache ({dropped=}); size+mtime check {1e6 * min(check):.0f} µs; load {result['load_average_1min']}")


if __name__ == "__main__":
    main()
