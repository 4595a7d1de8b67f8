"""`align run` (validation, plan, skip / resume / refuse / --force, stage-name references, gates), `align pairs`,
`align eval` (against a direct computation) and `align report` (PNGs and summary pages)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import kill_at_checkpoint

import align
from align.errors import AlignError
from align.pipeline import resolve

FAST = {"tensorboard": False, "logging_steps": 1}


def pipeline_spec(tiny_model: str, out: Path, **sft_extra) -> dict:
    return {
        "model": tiny_model, "output": str(out), "seed": 3, "defaults": FAST,
        "eval": {"data": "arith-prompts-eval", "max_samples": 12, "max_new_tokens": 5},
        "stages": [
            {"name": "sft", "kind": "sft", "data": "arith", "max_steps": 6, "batch_size": 8, "lr": 3e-3,
             "packing": False, **sft_extra},
            {"name": "pairs", "kind": "pairs", "data": "arith-prompts", "reward": ["closeness"], "max_prompts": 12,
             "num_generations": 4, "max_completion_length": 5},
            {"name": "dpo", "kind": "dpo", "data": "pairs", "max_steps": 2, "batch_size": 4},
        ],
    }


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("pipe") / "out"
    spec = pipeline_spec(tiny_model, out)
    return spec, align.run(spec)


# -- validation ----------------------------------------------------------------------------------------------
def test_validation_reports_every_problem_by_stage(tiny_model, tmp_path):
    spec = {"model": tiny_model, "output": str(tmp_path / "o"), "stages": [
        {"name": "sft", "kind": "sft", "data": "arith", "max_stepz": 3},
        {"name": "sft", "kind": "sft", "data": "arith"},
        {"name": "x", "kind": "grpoo", "data": "arith-prompts"},
        {"name": "dpo", "kind": "dpo", "from": "later", "data": str(tmp_path / "missing.jsonl")},
        {"name": "ppo", "kind": "ppo", "data": "arith-prompts"},
        {"name": "grpo", "kind": "grpo", "data": "arith-prompts", "reward": ["rm"]},
        {"name": "rm", "kind": "rm", "from": "sft", "data": "arith-prefs", "gate": {"metric": "accuracy"}},
    ]}
    with pytest.raises(AlignError) as err:
        resolve(spec, "p.yaml")
    text = str(err.value)
    for expected in ("stage 'sft': unknown option 'max_stepz'. Did you mean 'max_steps'?",
                     "stage name 'sft' is used twice",
                     "Unknown stage kind 'grpoo'. Did you mean 'grpo'?",
                     "stage 'dpo': from 'later' is neither a stage",
                     "missing.jsonl",
                     "stage 'ppo': Give at least one reward",
                     "stage 'grpo': 'rm' refers to a stage that comes later",
                     "stage 'rm': a gate compares held-out metrics of policies"):
        assert expected in text, (expected, text)
    assert not (tmp_path / "o").exists(), "validation writes nothing"


def test_mistyped_sample_names_are_reported_once_even_offline(tiny_model, tmp_path):
    """A mistyped bundled name is caught at validation even with HF_HUB_OFFLINE set (the tests' default) — it is not
    taken for a hub id that cannot be checked now — and only once: the rm-trained stage's default gold (the eval
    block's metrics) does not guess at accuracy and fail on a missing answer column too."""
    spec = {"model": tiny_model, "output": str(tmp_path / "o"), "eval": {"data": "reviews-evl", "reward": ["positive"]},
            "stages": [{"name": "rm", "kind": "rm", "data": "arith-pref"},
                       {"name": "ppo", "kind": "ppo", "data": "reviews-prompts", "reward_model": "rm"}]}
    with pytest.raises(AlignError) as err:
        resolve(spec, "p.yaml")
    problems = err.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("p.yaml: eval: data: Dataset 'reviews-evl' is not a local file or directory, nor a "
                                  "bundled sample. Did you mean 'reviews-eval'?")
    assert problems[1].startswith("p.yaml: stage 'rm': Dataset 'arith-pref' is not a local file or directory, nor a "
                                  "bundled sample. Did you mean 'arith-prefs'?")


def test_stage_names_resolve_to_runs(tiny_model, tmp_path):
    out = tmp_path / "out"
    spec = {"model": tiny_model, "output": str(out), "seed": 5, "defaults": {"adapter": "dora", "lr": 1e-3}, "stages": [
        {"name": "sft", "kind": "sft", "data": "arith"},
        {"name": "rm", "kind": "rm", "data": "arith-prefs", "lr": 2e-3},
        {"name": "pairs", "kind": "pairs", "data": "arith-prompts", "reward": ["accuracy"]},
        {"name": "ppo", "kind": "ppo", "from": "sft", "data": "arith-prompts", "reward_model": "rm", "reward": ["rm@0.5"]},
        {"name": "dpo", "kind": "dpo", "data": "pairs"},
    ]}
    _, stages = resolve(spec, "p")
    by = {s.name: s for s in stages}
    assert by["sft"].cfg.model == tiny_model and by["sft"].cfg.from_run is None
    assert by["rm"].cfg.from_run == str(out / "sft") and by["rm"].cfg.lr == 2e-3, "from defaults to the previous policy"
    assert by["ppo"].cfg.reward_model == str(out / "rm") and by["ppo"].cfg.reward == [f"{out / 'rm'}@0.5"]
    assert by["dpo"].cfg.from_run == str(out / "ppo"), "the previous policy stage"
    assert by["dpo"].cfg.data == str(out / "pairs" / "pairs.jsonl")
    assert by["sft"].cfg.adapter == "dora" and by["sft"].cfg.seed == 5 and by["sft"].cfg.output == str(out / "sft")
    assert by["ppo"].refs == {"sft", "rm"}


# -- running -------------------------------------------------------------------------------------------------
def test_pipeline_runs_every_stage_and_writes_pipeline_json(finished):
    spec, result = finished
    out = Path(spec["output"])
    assert result["status"] == "completed"
    assert [s["status"] for s in result["stages"]] == ["completed"] * 3
    assert [r["stage"] for r in result["table"]] == ["base", "sft", "pairs", "dpo"]
    sft, pairs, dpo = result["stages"]
    assert sft["eval"]["prompts"] == 12 and 0 <= sft["eval"]["accuracy"] <= 1
    assert sft["eval"]["kl"] > 0, "sft moved away from the base"
    assert result["base"]["eval"]["accuracy"] is not None and "kl" not in result["base"]["eval"]
    assert pairs["metrics"]["pairs"] > 0
    lines = (out / "pairs" / "pairs.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["chosen"] != first["rejected"] and first["margin"] > 0 and "answer" in first
    dpo_manifest = json.loads((out / "dpo" / "run.json").read_text())
    assert dpo_manifest["parent"] == str((out / "sft").resolve())
    assert dpo_manifest["datasets"]["train"]["path"].endswith("pairs.jsonl")
    assert dpo["lineage"] and dpo["from"] == "sft"


def test_rerun_skips_and_change_is_refused_then_forced(finished, cli, tmp_path):
    spec, _ = finished
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = cli("run", path, "--dry-run")
    assert code == 0 and out.count(" skip") == 3, out
    before = (Path(spec["output"]) / "sft" / "run.json").read_text()
    code, _, _ = cli("run", path)
    assert code == 0 and (Path(spec["output"]) / "sft" / "run.json").read_text() == before, "skipped stages untouched"

    spec["stages"][2]["max_steps"] = 3
    path.write_text(yaml.safe_dump(spec))
    code, _, err = cli("run", path)
    assert code == 2 and "stage 'dpo'" in err and "max_steps (2 -> 3)" in err and "Traceback" not in err
    spec["stages"][0]["lr"] = 2e-3
    path.write_text(yaml.safe_dump(spec))
    code, out, _ = cli("run", path, "--dry-run", "--force")
    assert code == 0
    actions = {line.split()[0]: line.split()[3] for line in out.splitlines()[1:] if line.split()}
    assert actions == {"sft": "rerun", "pairs": "rerun", "dpo": "rerun"}, out


def test_interrupted_stage_resumes(cli, tiny_model, tmp_path):
    out = tmp_path / "out"
    spec = pipeline_spec(tiny_model, out, save_steps=2)
    spec["stages"] = spec["stages"][:1]
    spec["stages"][0]["max_steps"] = 8
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    kill_at_checkpoint([sys.executable, "-m", "align", "run", str(path)], out / "sft", 2)
    code, plan, err = cli("run", path, "--dry-run")  # the plan and the rerun need no process of their own
    assert code == 0 and "resume" in plan, plan + err
    code, _, err = cli("run", path)
    assert code == 0, err[-2000:]
    manifest = json.loads((out / "sft" / "run.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["resumed_at"]) == 1
    steps = [m["step"] for m in map(json.loads, (out / "sft" / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == list(range(1, 9))


def test_gate_stops_a_regressed_stage(finished, tmp_path, cli):
    spec, _ = finished
    gated = json.loads(json.dumps(spec))
    gated["output"] = str(tmp_path / "gated")
    gated["stages"] = [gated["stages"][0], {"name": "sft2", "kind": "sft", "data": "arith", "max_steps": 1,
                                            "batch_size": 2, "lr": 1e-6, "gate": {"metric": "accuracy", "min_delta": 0.5}},
                       {"name": "after", "kind": "dpo", "data": "arith-prefs", "max_steps": 1}]
    path = tmp_path / "gated.yaml"
    path.write_text(yaml.safe_dump(gated))
    code, _, err = cli("run", path)
    assert code == 3, err
    assert "Gate failed after stage 'sft2'" in err and "min_delta +0.5000" in err
    assert not (tmp_path / "gated" / "after").exists(), "nothing after the gate ran"
    data = json.loads((tmp_path / "gated" / "pipeline.json").read_text())
    assert data["status"] == "gated" and data["stages"][1]["gate"]["passed"] is False


# -- eval ----------------------------------------------------------------------------------------------------
def test_eval_equals_a_direct_computation(finished, tmp_path):
    from align.generate import generate, load_target

    spec, _ = finished
    run = Path(spec["output"]) / "sft"
    data = tmp_path / "held.jsonl"
    problems = [("What is 3 + 4?", "7"), ("What is 10 - 2?", "8"), ("What is 1 + 1?", "2"), ("What is 9 + 9?", "18")]
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in problems))
    result = align.evaluate(run, data=str(data), max_new_tokens=5, reward=["closeness"], batch_size=3)

    model, tokenizer, _ = load_target(str(run))
    texts = generate(model, tokenizer, [p for p, _ in problems], max_new_tokens=5)
    from align.rewards.builtin import numbers

    correct = [bool(numbers(t)) and numbers(t)[-1] == float(a) for t, (_, a) in zip(texts, problems, strict=True)]
    assert result["accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert [e["completion"] for e in result["examples"]] == texts
    assert result["reference"] == str(Path(spec["model"]).resolve()), "default reference: the run's parent (the base)"
    assert result["kl"] > 0 and 0 <= result["reward/closeness"] <= 1

    same = align.evaluate(run, data=str(data), max_new_tokens=5, reference=str(run))
    assert same["kl"] == pytest.approx(0.0, abs=1e-6), "KL of a policy to itself"


def test_eval_on_preference_pairs_matches_log_probs(finished, tmp_path):
    from align.evaluation import _pair_ids
    from align.generate import load_target

    spec, _ = finished
    run = Path(spec["output"]) / "sft"
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}) + "\n")
    result = align.evaluate(run, data=str(data), reference="none")
    model, tokenizer, _ = load_target(str(run))
    logps = []
    for answer in ("4", "5"):
        p, c = _pair_ids(tokenizer, [{"role": "user", "content": "What is 2 + 2?"}],
                         [{"role": "assistant", "content": answer}])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
        logps.append(sum(logits[len(p) - 1 + i, t].item() for i, t in enumerate(c)))
    assert result["margin"] == pytest.approx(logps[0] - logps[1], abs=1e-4)
    assert result["preference_accuracy"] == float(logps[0] > logps[1])


def test_eval_cli_errors(cli, finished, tmp_path):
    spec, _ = finished
    code, _, err = cli("eval", Path(spec["output"]) / "sft", "--num-samples", "4")
    assert code == 2 and "--data is required" in err and "--temperature > 0" in err


# -- report --------------------------------------------------------------------------------------------------
def test_the_pipeline_chart_shows_the_tables_metric(tmp_path):
    """The pipeline page's chart plots what the table reports for policies: accuracy when the eval data has answers,
    else the mean eval reward (the reviews demo) — never nothing."""
    from align.report import _stage_bars

    rows = [{"stage": "base", "from": "-", "reward": 0.0}, {"stage": "sft", "from": "base", "reward": 0.6},
            {"stage": "rm", "from": "sft", "preference_accuracy": 0.9}, {"stage": "ppo", "from": "sft", "reward": 0.9}]
    (reward,) = _stage_bars(rows, tmp_path, ["positive"])
    assert reward.name == "held_out_reward.png" and reward.read_bytes()[:4] == b"\x89PNG"
    rows = [{**r, "accuracy": r.get("reward")} for r in rows if "reward" in r]
    assert [p.name for p in _stage_bars(rows, tmp_path, [])] == ["held_out_accuracy.png"]
    assert _stage_bars([{"stage": "rm", "from": "sft", "preference_accuracy": 0.9}], tmp_path, []) == []


def test_report_writes_pngs_and_a_summary_naming_every_stage(finished, cli):
    spec, _ = finished
    out = Path(spec["output"])
    code, stdout, err = cli("report", out)
    assert code == 0, err
    page = (out / "report" / "report.md").read_text()
    for name in ("base", "sft", "pairs", "dpo"):
        assert f"| {name} |" in page
    html = (out / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    for series in ("loss", "learning_rate", "grad_norm"):
        png = out / "sft" / "report" / f"{series}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert (out / "dpo" / "report" / "rewards_margins.png").is_file()
    assert (out / "report" / "held_out_accuracy.png").is_file()
    assert "<a href='../sft/report/report.html'>report</a>" in html, "the stage reports are links"
    dpo_page = (out / "dpo" / "report" / "report.md").read_text()
    lineage = next(line for line in dpo_page.splitlines() if line.startswith("| lineage |"))
    assert "?" not in lineage and "sft (sft) → dpo" in lineage, lineage
    assert "| option (differs from the default) | value |" in dpo_page and "```folded" in dpo_page
    dpo_html = (out / "dpo" / "report" / "report.html").read_text()
    assert "<details><summary>full resolved config</summary>" in dpo_html
    shown = [line.split("](")[1].rstrip(")") for line in dpo_page.splitlines() if line.startswith("![")]
    assert shown[0] == "loss.png" and shown.index("learning_rate.png") > shown.index("rewards_margins.png"), shown
    pairs_page = (out / "pairs" / "report" / "report.md").read_text()
    assert "None" not in pairs_page.split("## Run")[1].split("##")[0], "no empty fields on a pairs run's page"


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_pass_a_dry_run(recipe, monkeypatch, tmp_path):
    """Every shipped recipe validates (options, kinds, names, rewards, local data) and plans; hub data is offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = yaml.safe_load(recipe.read_text())
    spec["output"] = str(tmp_path / "out")
    if "gpu" not in recipe.parts:  # the embedded default: a local base the README builds first (align tiny-model)
        spec["model"] = str(tmp_path / "base")
        (tmp_path / "base").mkdir()
        (tmp_path / "base" / "config.json").write_text("{}")
        for stage in spec["stages"]:  # a stage's own local model (recipes/rlhf-encoder.yaml: the exported encoder)
            if stage.get("model"):
                stage["model"] = spec["model"]
    result = align.run(spec, dry_run=True)
    assert [s["action"] for s in result["plan"]] == ["run"] * len(spec["stages"])


def test_the_same_paths_spelled_another_way_are_no_change(tiny_model, tmp_path, monkeypatch):
    """A finished pipeline run again with its model and output given relative to another working directory (the
    same directories) skips every stage: a path is compared by what it names, not by how it is spelled."""
    spec = {"model": tiny_model, "output": str(tmp_path / "out"), "stages": [
        {"name": "sft", "kind": "sft", "data": "arith", "max_steps": 1, "tensorboard": False},
        {"name": "dpo", "kind": "dpo", "data": "arith-prefs", "max_steps": 1, "tensorboard": False}]}
    align.run(spec)
    monkeypatch.chdir(tmp_path)
    again = {**spec, "model": os.path.relpath(tiny_model), "output": "./out"}
    assert [s["action"] for s in align.run(again, dry_run=True)["plan"]] == ["skip", "skip"]
    changed = {**again, "stages": [{**spec["stages"][0], "lr": 0.123}, spec["stages"][1]]}
    with pytest.raises(AlignError, match="lr"):  # a real change is still one
        align.run(changed, dry_run=True)


def test_a_stage_directory_with_foreign_files_is_refused(tiny_model, tmp_path):
    from align.pipeline import plan

    spec = pipeline_spec(tiny_model, tmp_path / "out")
    (tmp_path / "out" / "sft").mkdir(parents=True)
    (tmp_path / "out" / "sft" / "notes.txt").write_text("mine")
    _, stages = resolve(spec, "p")
    with pytest.raises(AlignError, match="holds files but no run.json"):
        plan(stages, force=False)
    plan(stages, force=True)
    assert stages[0].action == "rerun"
