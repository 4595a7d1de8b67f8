"""bench/demo_seeds.py --smoke: builds a base, runs the demo recipe shrunk to a few steps on one seed, and prints the
seed table with a row for every stage (the five-seed measurement itself is the script's, not a test's)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("demo_seeds", ROOT / "bench" / "demo_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_runs_every_stage_and_prints_the_table(tmp_path, capsys):
    import yaml

    script = _load_script()
    assert script.main(["--smoke", "--seeds", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())
    run = summary["runs"][0]
    assert summary["seeds"] == [2] and run["status"] == "completed"
    assert [name for name, _ in run["stages"]] == [s["name"] for s in recipe["stages"]]
    assert all(status == "completed" for _, status in run["stages"])
    lines = out.splitlines()  # the trainers' own logs come first; the table is printed last
    lines = lines[max(i for i, line in enumerate(lines) if line.split()[:3] == ["stage", "from", "seed"]):]
    scored = {s["name"] for s in recipe["stages"] if s["kind"] != "pairs"}
    assert {line.split()[0] for line in lines[1:]} >= scored | {"base", "wall"}
