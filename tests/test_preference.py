"""Preference stages and hand-off: DPO starts at ln 2 from a moved parent (so the reference is the parent
policy, not the base), for LoRA and QLoRA parents and both hand-off ways; the reward model and DPO learn the
toy preference task; wrong parents are refused; lineage lists the whole chain."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import completion_loss

from align.data import load_examples
from align.handoff import load_run_policy
from align.models import load_base_model, load_tokenizer

SFT_ARGS = ["--data", "arith", "--max-steps", "10", "--lr", "2e-2", "--batch-size", "16", "--no-packing",
            "--no-tensorboard"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pref")


def _run(cli, *args) -> None:
    code, _, err = cli(*args)
    assert code == 0, err


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def moved_parents(runs, tiny_model):
    """SFT runs whose adapters have clearly moved away from the base (high learning rate)."""
    from align.cli import main

    parents = {}
    for adapter in ("lora", "qlora"):
        out = runs / f"sft-{adapter}"
        assert main(["sft", "--model", tiny_model, "--output", str(out), "--adapter", adapter, *SFT_ARGS]) == 0
        parents[adapter] = out
    return parents


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
@pytest.mark.parametrize("handoff", ["continue", "merge"])
def test_dpo_from_a_moved_parent_starts_at_ln2(cli, runs, tiny_model, moved_parents, adapter, handoff):
    parent = moved_parents[adapter]
    examples, _, _ = load_examples("arith-eval")
    base_loss = completion_loss(load_base_model(tiny_model), load_tokenizer(tiny_model), examples[:32])
    model, tokenizer, _ = load_run_policy(parent)
    assert abs(completion_loss(model, tokenizer, examples[:32]) - base_loss) > 0.5, "parent must differ from base"

    out = runs / f"dpo-{adapter}-{handoff}"
    _run(cli, "dpo", "--from", parent, "--handoff", handoff, "--data", "arith-prefs", "--output", out,
         "--max-steps", "2", "--batch-size", "8", "--logging-steps", "1", "--no-tensorboard")
    first = _metrics(out)[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["parent"] == str(parent.resolve()) and manifest["handoff"] == handoff
    assert manifest["quantized_4bit"] == (adapter == "qlora")
    assert manifest["adapter"] == adapter
    assert (len(manifest["merged_adapters"]) == 1) == (handoff == "merge")
    # only the trained adapter is saved (not TRL's frozen "ref" copy), and it reloads
    assert not (out / "adapter" / "ref").exists()
    load_run_policy(out)


def test_reward_model_learns_and_scores_held_out_pairs(cli, runs, moved_parents):
    out = runs / "rm"
    _run(cli, "rm", "--from", moved_parents["lora"], "--data", "arith-prefs", "--eval-data", "arith-prefs-eval",
         "--output", out, "--max-steps", "40", "--batch-size", "16", "--lr", "1e-3", "--logging-steps", "10",
         "--no-tensorboard")
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["task"] == "seq-cls" and manifest["metrics"]["eval_accuracy"] >= 0.8
    code, output, err = cli("rm", "score", out, "--data", "arith-prefs-eval")
    assert code == 0, err
    accuracy = float(output.strip().splitlines()[-1].split()[1])
    assert accuracy >= 0.8  # the reloaded model, scoring through the reward protocol


def test_reward_model_on_an_encoder_base(cli, runs, tmp_path):
    from align.tiny import build_tiny_model

    bert = build_tiny_model(tmp_path / "bert", arch="bert")
    out = runs / "rm-bert"
    _run(cli, "rm", "--model", bert, "--data", "arith-prefs", "--eval-data", "arith-prefs-eval", "--output", out,
         "--max-steps", "30", "--batch-size", "16", "--lr", "1e-3", "--logging-steps", "10", "--no-tensorboard")
    assert json.loads((out / "run.json").read_text())["metrics"]["eval_accuracy"] >= 0.8


def test_dpo_raises_the_held_out_margin(cli, runs, moved_parents):
    out = runs / "dpo-learn"
    _run(cli, "dpo", "--from", moved_parents["lora"], "--data", "arith-prefs", "--eval-data", "arith-prefs-eval",
         "--output", out, "--max-steps", "30", "--batch-size", "16", "--lr", "5e-4", "--logging-steps", "10",
         "--eval-batch-size", "200", "--no-tensorboard")
    evals = [m for m in _metrics(out) if "eval_rewards/margins" in m]
    assert evals[0]["step"] == 0 and evals[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert evals[-1]["eval_rewards/margins"] > 1.0 and evals[-1]["eval_rewards/accuracies"] > 0.9


def test_lineage_lists_the_whole_chain(cli, runs, moved_parents):
    first = runs / "dpo-lora-continue"
    if not first.exists():
        _run(cli, "dpo", "--from", moved_parents["lora"], "--data", "arith-prefs", "--output", first,
             "--max-steps", "1", "--no-tensorboard")
    second = runs / "dpo-of-dpo"
    _run(cli, "dpo", "--from", first, "--data", "arith-prefs", "--output", second, "--max-steps", "1",
         "--no-tensorboard")
    lineage = json.loads((second / "run.json").read_text())["lineage"]
    assert [(step["stage"], Path(step["run"])) for step in lineage] == [
        ("sft", moved_parents["lora"].resolve()), ("dpo", first.resolve())]
    sft_manifest = json.loads((moved_parents["lora"] / "run.json").read_text())
    assert json.loads((second / "run.json").read_text())["base_model"] == sft_manifest["base_model"]


def test_wrong_parents_are_refused(cli, runs, moved_parents, tmp_path, tiny_model):
    dpo = ["dpo", "--data", "arith-prefs", "--output", tmp_path / "out", "--max-steps", "1"]
    code, _, err = cli(*dpo, "--from", tmp_path)
    assert code == 2 and "is not an align run directory" in err

    unfinished = tmp_path / "unfinished"
    shutil.copytree(moved_parents["lora"], unfinished)
    manifest = json.loads((unfinished / "run.json").read_text())
    (unfinished / "run.json").write_text(json.dumps({**manifest, "status": "running"}))
    code, _, err = cli(*dpo, "--from", unfinished)
    assert code == 2 and "status is 'running', not 'completed'" in err

    if not (runs / "rm").exists():
        _run(cli, "rm", "--from", moved_parents["lora"], "--data", "arith-prefs", "--output", runs / "rm",
             "--max-steps", "1", "--no-tensorboard")
    code, _, err = cli(*dpo, "--from", runs / "rm")
    assert code == 2 and "a 'rm' run cannot be the policy parent of dpo; start from a policy run" in err
    assert "--reward-model" not in err, "dpo has no --reward-model: the hint is for grpo / ppo / pairs"

    other = tmp_path / "other-base"
    shutil.copytree(tiny_model, other)
    code, _, err = cli(*dpo, "--from", moved_parents["lora"], "--model", other)
    assert code == 2 and "Base/adapter mismatch" in err and "--model" in err

    moved_base = tmp_path / "moved-base"
    shutil.copytree(tiny_model, moved_base)
    child = tmp_path / "child"
    _run(cli, "sft", "--model", moved_base, "--data", "arith", "--output", child, "--max-steps", "1", "--no-tensorboard")
    config = json.loads((moved_base / "config.json").read_text())
    (moved_base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    code, _, err = cli(*dpo, "--from", child)
    assert code == 2 and "changed since" in err
    assert not (tmp_path / "out").exists(), "nothing is written for a refused run"


def test_continue_refuses_another_adapter_kind(cli, moved_parents, tmp_path):
    code, _, err = cli("dpo", "--from", moved_parents["lora"], "--adapter", "dora", "--data", "arith-prefs",
                       "--output", tmp_path / "x", "--max-steps", "1", "--no-tensorboard")
    assert code == 2 and "--handoff merge" in err


def test_precomputed_reference_gives_the_same_first_loss(cli, runs, moved_parents):
    out = runs / "dpo-precompute"
    _run(cli, "dpo", "--from", moved_parents["lora"], "--data", "arith-prefs", "--output", out, "--max-steps", "2",
         "--batch-size", "8", "--logging-steps", "1", "--precompute-ref-log-probs", "--no-tensorboard")
    assert _metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_pairs_per_prompt_pairs_the_best_with_distinct_lower_completions():
    from align.stages.pairs import make_pairs

    rows = [{"prompt": "p", "answer": "1"}, {"prompt": "q", "answer": "2"}]
    texts = ["1", "7", "7", "3", "1", "2", "2", "2"]
    scores = [1.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]  # q: every completion scored the same (a tie: no pair)
    pairs = make_pairs(rows, texts, scores, 4, per_prompt=3)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"], p["margin"]) for p in pairs] == [
        ("1", "7", 1.0), ("1", "3", 0.5)]
    assert len(make_pairs(rows, texts, scores, 4)) == 1  # the default: one (best, worst) pair per prompt


def test_a_reward_models_new_head_is_not_reported_as_a_loading_problem(tiny_model, tmp_path, caplog):
    """transformers reports a sequence-classification head missing from a causal-LM checkpoint and advises training
    it; that is what the rm stage does, so the report is held back — but not when something else is off."""
    import torch
    from safetensors.torch import load_file, save_file

    load_base_model(tiny_model, task="seq-cls")
    assert "LOAD REPORT" not in caplog.text

    odd = tmp_path / "odd"
    shutil.copytree(tiny_model, odd)
    weights = load_file(odd / "model.safetensors")
    save_file({**weights, "stray.weight": torch.zeros(2)}, odd / "model.safetensors", metadata={"format": "pt"})
    load_base_model(str(odd), task="seq-cls")
    assert "LOAD REPORT" in caplog.text and "stray.weight" in caplog.text
