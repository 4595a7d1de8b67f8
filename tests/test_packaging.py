"""The repository's layout (align/, stages/, rewards/, data/ side by side) installs as ONE package, `align`.

Guards issue #9: the wheel holds only `align/...` (with the bundled samples and the vLLM plugin entry point), a
regular install imports every subpackage from site-packages, and an editable install maps `align.stages` to the
repository's `stages/` folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, cwd=out)
    (path,) = out.glob("align-*.whl")
    return path


def test_wheel_holds_only_the_align_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    roots = {n.split("/")[0] for n in names}
    assert {r for r in roots if not r.endswith(".dist-info")} == {"align"}
    for expected in ("align/cli.py", "align/stages/sft.py", "align/rewards/builtin.py", "align/data/loading.py",
                     "align/data/samples/__init__.py", "align/data/samples/arith_sft.jsonl",
                     "align/accelerate/ddp.yaml", "align/accelerate/fsdp2.yaml"):
        assert expected in names, expected
    assert not any(n.startswith(("stages/", "rewards/", "data/", "tests/")) for n in names)
    (ep,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(ep).decode()
    assert "align_cpu_lora = align.stages.vllm_cpu_lora:register" in text


def test_regular_install_imports_every_subpackage(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    assert not any((target / name).exists() for name in ("stages", "rewards", "data"))
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import align.stages.sft, align.rewards, align.data.samples as s\n"
            "print(align.stages.sft.__file__)\nprint(s.bundled_path('arith').is_file())")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    first, second = out.stdout.split()
    assert Path(first) == target / "align" / "stages" / "sft.py"
    assert second == "True"
    help_out = subprocess.run([sys.executable, "-m", "align", "--help"], env=env, cwd=tmp_path, capture_output=True,
                              text=True)
    assert help_out.returncode == 0 and "sft" in help_out.stdout


def test_this_checkout_maps_subpackages_to_top_level_folders():
    import align.data.samples
    import align.rewards.builtin
    import align.stages.sft

    if not Path(align.stages.sft.__file__).resolve().is_relative_to(REPO):
        pytest.skip("align is not installed from this checkout in editable mode")
    assert Path(align.stages.sft.__file__).resolve() == REPO / "stages" / "sft.py"
    assert Path(align.rewards.builtin.__file__).resolve() == REPO / "rewards" / "builtin.py"
    assert align.data.samples.bundled_path("arith").resolve() == REPO / "data" / "samples" / "arith_sft.jsonl"


def test_vllm_plugin_entry_point_and_python_m_align():
    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "align_cpu_lora"]
    assert ep.value == "align.stages.vllm_cpu_lora:register"
    assert callable(ep.load())
    out = subprocess.run([sys.executable, "-m", "align", "sft", "--help"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and "--adapter" in out.stdout
