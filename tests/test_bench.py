"""Every benchmark in bench/ runs its `--smoke` mode (tiny sizes, one round, a couple of steps), so a bench that breaks
fails the test suite instead of rotting until someone re-measures.

Each smoke runs as its own process from the repository root, offline, and ends with its own check that every side
it compares actually ran (step times, losses, outputs) and the line `smoke OK: <bench>`; it writes no results
(bench/results/ must be left exactly as it was) and does not wait for a quiet machine. Nothing here looks at how long
a smoke took: the timeout only stops a hung process. Skipped or partial only where a side cannot run at all:
bench/rollout.py without an importable vLLM; bench/ppo_vs_trl.py's TRL sides without bench/.venv-trl013 (made by
`python bench/ppo_vs_trl.py --setup`, which .ci/run runs at install time; the align side runs regardless).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TIMEOUT = 1800  # a hang guard, far above any smoke's time on a loaded 2-core machine; never a verdict on speed

SCRIPTS = ["adapters.py", "async_grpo.py", "dpo_reference.py", "gpu_sft.py", "hash_cost.py", "packing.py", "ppo.py",
           "ppo_vs_trl.py", "rollout.py", "sft_overhead.py", "gpu_distributed.sh"]


@functools.cache
def vllm_imports() -> bool:
    return subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode == 0


def results_state() -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in (BENCH / "results").iterdir()}


TESTED_ELSEWHERE = {"demo_seeds.py": "tests/test_demo_seeds.py (its smoke runs the whole demo pipeline in small)"}


def test_every_bench_script_has_a_smoke_test():
    scripts = sorted(p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh") and not p.name.startswith("_"))
    assert scripts == sorted([*SCRIPTS, *TESTED_ELSEWHERE])


@pytest.mark.slow  # each a process of its own; `pytest -m slow` (CI) runs them
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_smoke(script):
    name = script.rsplit(".", 1)[0]
    if name == "rollout" and not vllm_imports():
        pytest.skip("bench/rollout.py needs vLLM (`import vllm` fails here)")
    cmd = ["bash", str(BENCH / script), "--smoke"] if script.endswith(".sh") else \
        [sys.executable, str(BENCH / script), "--smoke"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # `align`, `python`
    before = results_state()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        pytest.fail(f"{script} --smoke still running after {TIMEOUT} s (hung?):\n{out[-3000:]}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} --smoke exited {proc.returncode}:\n{output[-5000:]}"
    assert f"smoke OK: {name}" in proc.stdout.splitlines(), output[-5000:]
    assert results_state() == before, "a smoke run changed bench/results/"
    if name == "ppo_vs_trl" and "TRL sides skipped" in proc.stdout:
        warnings.warn("bench/ppo_vs_trl.py --smoke ran the align side only: bench/.venv-trl013 is absent "
                      "(python bench/ppo_vs_trl.py --setup creates it)", stacklevel=1)
