"""Shared fixtures: a tiny local model (built once per session), paths to the committed test data, and an
in-process CLI runner that returns (exit code, stdout, stderr).

The suite runs in parallel (pytest-xdist, `-n auto --dist loadfile` in pyproject.toml: one worker per core, each
test file on one worker, so a module's fixtures are built once). Each worker, and every process a test starts, gets
an equal share of the cores as torch's thread count (OMP_NUM_THREADS), so N workers do not oversubscribe the
machine; `pytest -n 0` runs serially with torch's default threads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:  # set before anything imports torch
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from align.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def cli(capsys):
    """Run `align ARGS...` in process; returns (code, stdout, stderr)."""
    from align.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors / --help
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def sft_run(tiny_model, tmp_path_factory) -> Path:
    """A short LoRA SFT run on the bundled task (shared by tests that need a finished run)."""
    import align

    return align.sft(model=tiny_model, data="arith", eval_data="arith-eval", output=tmp_path_factory.mktemp("runs") / "sft",
                     max_steps=20, lr=3e-3, batch_size=16, eval_batch_size=200, packing=False, logging_steps=10,
                     tensorboard=False)
