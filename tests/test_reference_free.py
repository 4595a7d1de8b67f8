"""`align orpo` and `align simpo` (reference-free): the first logged loss equals the loss computed by hand from the
starting policy's log-probs on the same batch (the whole 4-pair file in one batch, so the sampler's order does not
matter); both raise the held-out margin of the chosen answers. (tests/test_kto.py's pipeline runs an orpo stage.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import align
from align.data.preference import load_preferences
from align.handoff import load_run_policy

FAST = dict(logging_steps=1, tensorboard=False)


@pytest.fixture(scope="module")
def four_pairs(tmp_path_factory) -> Path:
    from align.data.samples import SAMPLES_DIR

    path = tmp_path_factory.mktemp("refree") / "four.jsonl"
    path.write_text("".join((SAMPLES_DIR / "arith_prefs.jsonl").read_text().splitlines(keepends=True)[:4]))
    return path


def _first(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def _sequences(tokenizer, pair: dict) -> dict[str, tuple[list[int], list[int]]]:
    """{"chosen"/"rejected": (prompt ids, answer ids)} as TRL's ORPO/CPO trainers tokenise a conversational pair:
    the chat template applied to text (trl.maybe_apply_chat_template), the answer = the tokens of prompt + answer
    after the prompt's, an EOS appended unless the answer ends with one (this tokenizer has no BOS)."""
    from trl.data_utils import maybe_apply_chat_template

    text = maybe_apply_chat_template(pair, tokenizer)
    prompt = tokenizer(text["prompt"], add_special_tokens=False)["input_ids"]
    out = {}
    for key in ("chosen", "rejected"):
        full = tokenizer(text["prompt"] + text[key], add_special_tokens=False)["input_ids"]
        assert full[: len(prompt)] == prompt
        answer = full[len(prompt):]
        out[key] = (prompt, answer + ([tokenizer.eos_token_id] if answer[-1] != tokenizer.eos_token_id else []))
    return out


def _token_logps(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log π of every token of prompt + answer after the first (position t predicts token t + 1)."""
    ids = prompt + answer
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return logits.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def _batch_terms(run_from: Path, data: Path):
    """Per pair: (ℓ_w, ℓ_l) the answer-token mean log-probs; and the chosen sequences' token log-probs (whole
    sequence, and answer only) for the NLL terms."""
    model, tokenizer, _ = load_run_policy(run_from)
    model.eval()
    pairs, _ = load_preferences(str(data))
    means, whole, answers = [], [], []
    for pair in pairs:
        seq = _sequences(tokenizer, pair)
        per = {k: _token_logps(model, *seq[k]) for k in seq}
        means.append(tuple(per[k][-len(seq[k][1]):].mean().item() for k in ("chosen", "rejected")))
        whole.append(per["chosen"])
        answers.append(per["chosen"][-len(seq["chosen"][1]):])
    return means, torch.cat(whole), torch.cat(answers)


def test_orpo_first_loss_by_hand(sft_run, four_pairs, tmp_path):
    beta = 0.4
    out = align.orpo(from_run=str(sft_run), data=str(four_pairs), output=str(tmp_path / "orpo"), max_steps=1,
                     batch_size=4, beta=beta, **FAST)
    means, whole, _ = _batch_terms(sft_run, four_pairs)
    nll = -whole.mean().item()  # TRL: token-mean cross-entropy over prompt + chosen answer
    log_odds = [(w - math.log1p(-math.exp(w))) - (lo - math.log1p(-math.exp(lo))) for w, lo in means]
    ratio = sum(-math.log1p(math.exp(-x)) for x in log_odds) / len(log_odds)  # mean log σ(log odds ratio)
    first = _first(out)
    assert first["nll_loss"] == pytest.approx(nll, abs=1e-4)
    assert first["log_odds_ratio"] == pytest.approx(ratio, abs=1e-4)
    assert first["loss"] == pytest.approx(nll - beta * ratio, abs=1e-4)
    assert abs(beta * ratio) > 1e-3, "the odds-ratio term contributes"


def test_simpo_first_loss_by_hand(sft_run, four_pairs, tmp_path):
    beta, gamma, alpha = 2.5, 0.7, 0.3
    out = align.simpo(from_run=str(sft_run), data=str(four_pairs), output=str(tmp_path / "simpo"), max_steps=1,
                      batch_size=4, beta=beta, gamma=gamma, sft_weight=alpha, **FAST)
    means, _, answers = _batch_terms(sft_run, four_pairs)
    simpo = sum(math.log1p(math.exp(-(beta * (w - lo) - gamma))) for w, lo in means) / len(means)
    nll = -answers.mean().item()  # CPO's NLL: token-mean cross-entropy over the chosen answers only
    first = _first(out)
    assert first["nll_loss"] == pytest.approx(nll, abs=1e-4)
    assert first["loss"] == pytest.approx(simpo + alpha * nll, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(beta * sum(w - lo for w, lo in means) / len(means), abs=1e-4)


@pytest.mark.parametrize("stage,beta", [("orpo", 1.0), ("simpo", 2.0)])
def test_reference_free_stages_raise_the_held_out_margin(sft_run, tmp_path, stage, beta):
    """The length-normalised log-likelihood margin ℓ(chosen) − ℓ(rejected) on held-out pairs (logged as
    eval_rewards/margins = β·that) rises from the starting policy's (evaluated at step 0)."""
    out = getattr(align, stage)(from_run=str(sft_run), data="arith-prefs", output=str(tmp_path / stage), beta=beta,
                                max_steps=20, lr=2e-3, batch_size=8, eval_data="arith-prefs-eval", eval_steps=20,
                                eval_batch_size=64, **FAST)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    margins = [m["eval_rewards/margins"] / beta for m in logged if "eval_rewards/margins" in m]
    assert margins[-1] > margins[0] + 0.3, margins
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stage"] == stage and manifest["reference"] == "none (reference-free loss)"


def test_pipeline_dry_run_with_reference_free_stages(tiny_model, tmp_path):
    spec = {"model": tiny_model, "output": str(tmp_path / "out"), "stages": [
        {"name": "sft", "kind": "sft", "data": "arith", "max_steps": 1},
        {"name": "simpo", "kind": "simpo", "data": "arith-prefs", "gamma": 0.5, "sft_weight": 0.1},
        {"name": "orpo", "kind": "orpo", "data": "arith-prefs", "beta": 0.2}]}
    plan = align.run(spec, dry_run=True)["plan"]
    assert [(s["name"], s["kind"], s["from"]) for s in plan] == [
        ("sft", "sft", "base"), ("simpo", "simpo", "sft"), ("orpo", "orpo", "simpo")]
