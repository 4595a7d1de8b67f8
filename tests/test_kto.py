"""`align kto`: the first two logged losses equal TRL's KTO loss computed by hand from the models' log-probs (the
reference is the parent policy, not the base), and so does a step whose KL baseline (from the batch neighbours'
completions) is positive; KTO on the bundled pairs turned unpaired raises the held-out preference margin; unpaired
data in and out (pairs --unpaired, data inspect); a pipeline sft -> kto -> orpo -> dpo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import align
from align.data.unpaired import load_unpaired, unpair
from align.handoff import load_run_policy
from align.models import load_base_model

FAST = dict(logging_steps=1, tensorboard=False)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ids(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of an unpaired row, as TRL's KTO tokenises a conversational example."""
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)["input_ids"]
    n = 0
    while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
        n += 1
    return full[:n], full[n:]


def _logp(model, prompt: list[int], completion: list[int]) -> float:
    """log π(completion | prompt), summed over the completion's tokens."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float().log_softmax(-1)
    return sum(logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion))


def hand_kto_loss(policy, reference, tokenizer, batch: list[dict], beta: float, w_d: float, w_u: float,
                  ) -> tuple[float, float]:
    """TRL 1.16's KTO loss of one batch (trl/trainer/kto_trainer.py, loss_type="kto"):
    r = log π(y|x) − log π_ref(y|x); z = max(0, mean_i [log π(y'_i|x_i) − log π_ref(y'_i|x_i)]) with y'_i the completion
    of row i − 1 (rotated inside the batch); desirable: w_d·(1 − σ(β(r − z))), undesirable: w_u·(1 − σ(β(z − r)));
    the mean over the batch. Returns (loss, z)."""
    ids = [_ids(tokenizer, row) for row in batch]
    mismatched = [(ids[i][0], ids[i - 1][1]) for i in range(len(ids))]  # i = 0 takes the last row's completion
    z = max(0.0, sum(_logp(policy, p, c) - _logp(reference, p, c) for p, c in mismatched) / len(batch))
    losses = []
    for row, (p, c) in zip(batch, ids, strict=True):
        r = _logp(policy, p, c) - _logp(reference, p, c)
        if row["label"]:
            losses.append(w_d * (1 - torch.sigmoid(torch.tensor(beta * (r - z))).item()))
        else:
            losses.append(w_u * (1 - torch.sigmoid(torch.tensor(beta * (z - r))).item()))
    return sum(losses) / len(losses), z


def test_first_losses_equal_trls_kto_loss_by_hand(sft_run, tiny_model, tmp_path):
    out = tmp_path / "kto"
    opts = dict(beta=0.5, desirable_weight=1.0, undesirable_weight=1.7, batch_size=6)
    align.kto(from_run=str(sft_run), data="arith-prefs", output=str(out), max_steps=2, lr=5e-3, save_steps=1,
              save_total_limit=0, **opts, **FAST)
    logged = _metrics(out)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["datasets"]["train"]["unpaired_from"] == "pairs" and manifest["reference"] == "parent policy (frozen)"
    assert not (out / "adapter" / "ref").exists(), "only the trained adapter is saved, not TRL's frozen copy"
    # the rows in the order the trainer reads them: align's reader (pairs split in two), shuffled once with the seed
    from align.stages.kto import KTOConfig, load_unpaired_data

    train, _, _ = load_unpaired_data(KTOConfig.from_kwargs(from_run=str(sft_run), data="arith-prefs", output="x"))
    first, second = train[:6], train[6:12]
    assert 0 < sum(r["label"] for r in first) < 6, "a batch with both labels makes the weights matter"

    parent, tokenizer, _ = load_run_policy(sft_run)
    parent.eval()
    beta, w_d, w_u = opts["beta"], opts["desirable_weight"], opts["undesirable_weight"]
    # step 1: the policy is its reference, the parent: every r and z are 0, so each row's loss is its weight / 2
    expected, _ = hand_kto_loss(parent, parent, tokenizer, first, beta, w_d, w_u)
    n_d = sum(r["label"] for r in first)
    assert expected == pytest.approx((w_d * n_d + w_u * (6 - n_d)) / 12, abs=1e-6)
    assert logged[0]["step"] == 1 and logged[0]["loss"] == pytest.approx(expected, abs=1e-5)
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    base = load_base_model(tiny_model).eval()
    wrong, _ = hand_kto_loss(parent, base, tokenizer, first, beta, w_d, w_u)
    assert abs(wrong - logged[0]["loss"]) > 0.05, "with the base as reference the first loss would differ"

    # step 2: the policy after one step (checkpoint-1) against the same frozen parent, KL baseline included
    from peft import PeftModel

    moved = PeftModel.from_pretrained(load_base_model(tiny_model), str(out / "checkpoints" / "checkpoint-1")).eval()
    expected, _ = hand_kto_loss(moved, parent, tokenizer, second, beta, w_d, w_u)
    assert logged[1]["step"] == 2 and logged[1]["loss"] == pytest.approx(expected, abs=1e-4)
    assert abs(logged[1]["loss"] - logged[0]["loss"]) > 1e-3, "the policy moved after one step"


def test_the_kl_baseline_by_hand(sft_run, tiny_model, tmp_path):
    """Step 2 with a KL baseline z > 0: every completion is "Yes." or "No.", so step 1 (mostly desirable "Yes.")
    raises log π("Yes." | any prompt) and the mismatched pairs of step 2 gain likelihood over the reference too."""
    labels = [True, True, True, False, True, False] + [True, True, False, True, True, True]
    rows = [{"prompt": f"What is {i} + {i + 3}?", "completion": "Yes." if good else "No.", "label": good}
            for i, good in enumerate(labels)]
    data = tmp_path / "yes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "kto"
    align.kto(from_run=str(sft_run), data=str(data), output=str(out), max_steps=2, lr=5e-3, batch_size=6, beta=0.5,
              shuffle=False, save_steps=1, save_total_limit=0, **FAST)
    logged = _metrics(out)
    from peft import PeftModel

    parent, tokenizer, _ = load_run_policy(sft_run)
    moved = PeftModel.from_pretrained(load_base_model(tiny_model), str(out / "checkpoints" / "checkpoint-1")).eval()
    second, _ = load_unpaired(str(data))
    expected, z = hand_kto_loss(moved, parent.eval(), tokenizer, second[6:], 0.5, 1.0, 1.0)
    assert z > 0.5, "the baseline is in play"
    assert logged[1]["kl"] == pytest.approx(z, abs=1e-4)
    assert logged[1]["loss"] == pytest.approx(expected, abs=1e-4)


def test_kto_raises_the_held_out_preference_margin(sft_run, tmp_path):
    """KTO from the sft run on the bundled pairs (split into unpaired rows): on held-out pairs, the implicit reward
    log π − log π_ref (π_ref = the sft parent) of the right answers rises above the wrong ones'."""
    out = align.kto(from_run=str(sft_run), data="arith-prefs", output=str(tmp_path / "kto"), max_steps=30, lr=2e-3,
                    batch_size=8, **FAST)
    start = align.evaluate(sft_run, data="arith-prefs-eval", max_samples=64, reference=str(sft_run))
    after = align.evaluate(out, data="arith-prefs-eval", max_samples=64)  # reference: the run's parent, the sft run
    assert after["reference"] == str(sft_run.resolve())
    assert start["margin"] == pytest.approx(0.0, abs=1e-4), "the starting policy is its reference"
    assert after["margin"] > 10.0 and after["preference_accuracy"] >= 0.9, after
    logged = _metrics(out)
    assert logged[-2]["rewards/margins"] > logged[0]["rewards/margins"] + 0.5


def test_unpaired_reader(tmp_path):
    data = tmp_path / "feedback.csv"
    data.write_text("question,response,thumbs_up\nWhat is 1 + 1?,2,true\nWhat is 1 + 2?,Maybe 5?,False\n")
    rows, _ = load_unpaired(str(data), columns=["prompt=question", "completion=response", "label=thumbs_up"],
                            system_prompt="Be brief.")
    assert [r["label"] for r in rows] == [True, False]
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"}]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "Maybe 5?"}]
    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    assert unpair([pair]) == [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                              {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]


def test_pairs_unpaired_feeds_kto_and_inspect_names_it(cli, sft_run, tmp_path):
    fb = tmp_path / "fb"
    code, _, err = cli("pairs", "--from", sft_run, "--data", "arith-prompts", "--reward", "closeness", "--unpaired",
                       "--desirable-score", "0.9", "--max-prompts", "6", "--num-generations", "4",
                       "--max-completion-length", "5", "-o", fb)
    assert code == 0, err
    rows = [json.loads(line) for line in (fb / "pairs.jsonl").read_text().splitlines()]
    assert rows and all(set(r) >= {"prompt", "completion", "label", "score"} for r in rows)
    assert all(r["label"] == (r["score"] >= 0.9) for r in rows)
    groups = {}
    for r in rows:
        groups.setdefault(json.dumps(r["prompt"]), []).append(r["completion"][0]["content"])
    assert len(groups) == 6 and all(len(texts) == len(set(texts)) for texts in groups.values()), "distinct completions"
    manifest = json.loads((fb / "run.json").read_text())
    assert manifest["metrics"]["rows"] == len(rows) and manifest["metrics"]["desirable"] == sum(r["label"] for r in rows)

    code, out, _ = cli("data", "inspect", fb / "pairs.jsonl")
    assert code == 0
    assert "format:   unpaired feedback" in out and "usable by: kto (as unpaired feedback)" in out
    desirable = sum(r["label"] for r in rows)
    assert f"labels:   {desirable} desirable (true), {len(rows) - desirable} undesirable (false)" in out


def test_pipeline_with_a_kto_stage(tiny_model, tmp_path, cli):
    import yaml

    spec = {"model": tiny_model, "output": str(tmp_path / "out"), "seed": 3, "defaults": FAST,
            "stages": [{"name": "sft", "kind": "sft", "data": "arith", "max_steps": 4, "batch_size": 8, "packing": False},
                       {"name": "kto", "kind": "kto", "data": "arith-prefs", "max_steps": 2, "batch_size": 4,
                        "undesirable_weight": 1.5},
                       {"name": "orpo", "kind": "orpo", "data": "arith-prefs", "max_steps": 1, "batch_size": 2},
                       {"name": "dpo", "kind": "dpo", "data": "arith-prefs", "max_steps": 1, "batch_size": 2}]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = cli("run", path, "--dry-run")
    assert code == 0, err
    assert [line.split()[:3] for line in out.splitlines() if line.startswith(("kto", "orpo", "dpo"))] == \
        [["kto", "kto", "sft"], ["orpo", "orpo", "kto"], ["dpo", "dpo", "orpo"]]
    code, _, err = cli("run", path)
    assert code == 0, err
    kto = json.loads((tmp_path / "out" / "kto" / "run.json").read_text())
    assert kto["status"] == "completed" and kto["parent"] == str((tmp_path / "out" / "sft").resolve())
    assert kto["config"]["undesirable_weight"] == 1.5
    from align.stages.kto import KTOConfig, load_unpaired_data

    train, _, _ = load_unpaired_data(KTOConfig.from_kwargs(model=tiny_model, data="arith-prefs", output="x", seed=3))
    n_d = sum(r["label"] for r in train[:4])
    assert _metrics(tmp_path / "out" / "kto")[0]["loss"] == pytest.approx((1.0 * n_d + 1.5 * (4 - n_d)) / 8, abs=1e-5)
    orpo = json.loads((tmp_path / "out" / "orpo" / "run.json").read_text())
    assert orpo["parent"] == str((tmp_path / "out" / "kto").resolve()), "a kto run is a policy parent"
    dpo = json.loads((tmp_path / "out" / "dpo" / "run.json").read_text())
    assert dpo["parent"] == str((tmp_path / "out" / "orpo").resolve()), "so is an orpo run"
