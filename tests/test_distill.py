"""`align distill`: on-policy distillation (TRL's DistillationTrainer) with align's hand-off.

Teacher: the session's sft run (tests/conftest.py `sft_run`: a tiny model fine-tuned on the bundled task). Student: a
smaller tiny base built with the same tokenizer. Checked: the first step's loss equals each divergence computed by
hand (at temperatures other than 1 too); the student moves toward the teacher (token-level KL to the
teacher on held-out prompts + the teacher's greedy answers, computed here from both models' logits, falls; the
student's log-likelihood of those answers rises); a student that is a copy of its teacher starts at loss 0 under every
divergence; a teacher with another tokenizer, a missing teacher and contradicting options exit 2 with their message
and write nothing; a pipeline's `teacher:` names an earlier stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

COMMON = ("--data", "arith-prompts", "--batch-size", "8", "--max-completion-length", "8", "--no-tensorboard")


@pytest.fixture(scope="session")
def student_base(tmp_path_factory) -> str:
    """A smaller tiny base (hidden 64, one layer, other seed) with the tokenizer of the `tiny_model` fixture."""
    from align.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("student") / "model", hidden_size=64, num_layers=1, seed=3))


def teacher_agreement(student: str, teacher: str, prompts: int = 32) -> tuple[float, float]:
    """(mean per-token KL(student ‖ teacher), mean per-token log-likelihood under the student) over the teacher's
    greedy completions (up to its first eos, 8 tokens at most) of held-out prompts, both from the models' logits."""
    import torch

    from align.data.prompts import load_prompts
    from align.generate import load_target

    teacher_model, tokenizer, _ = load_target(teacher)
    student_model, _, _ = load_target(student)
    rows, _ = load_prompts("arith-prompts-eval")
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
             for r in rows[:prompts]]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        sequences = teacher_model.generate(**batch, max_new_tokens=8, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)
        start = batch["input_ids"].shape[1]
        completion = sequences[:, start:]
        mask = torch.ones_like(completion)
        for i, row in enumerate(completion):
            eos = (row == tokenizer.eos_token_id).nonzero()
            if len(eos):
                mask[i, eos[0, 0] + 1:] = 0
        attention = torch.cat([batch["attention_mask"], mask], dim=1)

        def log_probs(model):
            logits = model(input_ids=sequences, attention_mask=attention).logits[:, start - 1:-1]
            return torch.log_softmax(logits.float(), dim=-1)

        teacher_lp, student_lp = log_probs(teacher_model), log_probs(student_model)
        kl = (student_lp.exp() * (student_lp - teacher_lp)).sum(-1)
        likelihood = student_lp.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    weight = mask.float()
    return float((kl * weight).sum() / weight.sum()), float((likelihood * weight).sum() / weight.sum())


def test_student_moves_toward_teacher(cli, sft_run, student_base, tmp_path):
    kl_before, likelihood_before = teacher_agreement(student_base, str(sft_run))
    run = tmp_path / "distill"
    code, _, err = cli("distill", "--model", student_base, "--teacher", sft_run, "--output", run, *COMMON,
                       "--max-steps", "24", "--lr", "1e-2", "--logging-steps", "4", "--seed", "1")
    assert code == 0, err
    kl_after, likelihood_after = teacher_agreement(str(run), str(sft_run))
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)
    assert likelihood_after > likelihood_before + 1.0, (likelihood_before, likelihood_after)

    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stage"] == "distill" and manifest["status"] == "completed"
    assert manifest["teacher"] == {"model": str(Path(sft_run).resolve()), "divergence": "reverse_kl", "trl_beta": 1.0}
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_copy_of_the_teacher_starts_at_loss_zero(cli, sft_run, tmp_path, divergence):
    """--from the teacher's own run: the student continues its adapter, the teacher is that adapter merged — the same
    function, so every divergence is 0 at the first step (up to the merge's float rounding)."""
    run = tmp_path / "copy"
    code, _, err = cli("distill", "--from", sft_run, "--teacher", sft_run, "--divergence", divergence, "--output", run,
                       *COMMON, "--max-steps", "1", "--logging-steps", "1")
    assert code == 0, err
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and abs(first["loss"]) < 1e-6, first
    assert json.loads((run / "run.json").read_text())["parent"] == str(Path(sft_run).resolve())


def divergence(student_lp, teacher_lp, kind: str, beta: float | None):
    """The per-position divergence written out from its definition (docs/DISTILL.md), on log-probabilities."""
    import torch

    ps, pt = student_lp.exp(), teacher_lp.exp()
    if kind == "reverse_kl":
        return (ps * (student_lp - teacher_lp)).sum(-1)
    if kind == "forward_kl":
        return (pt * (teacher_lp - student_lp)).sum(-1)
    log_m = torch.log(beta * pt + (1 - beta) * ps)
    return beta * (pt * (teacher_lp - log_m)).sum(-1) + (1 - beta) * (ps * (student_lp - log_m)).sum(-1)


@pytest.mark.parametrize(("kind", "beta", "temperature"), [("reverse_kl", None, 1.0), ("forward_kl", None, 2.0),
                                                           ("jsd", 0.3, 0.5)])
def test_first_step_loss_equals_the_hand_computed_divergence(cli, sft_run, student_base, tmp_path, kind, beta,
                                                             temperature):
    """With one completion token the loss looks only at the distributions after the prompt, whatever token is sampled:
    step 1 (every prompt in the batch, the student still its base) must be the mean over the prompts of the divergence
    between softmax(logits / T) of the student base and of the teacher, computed here from the definition."""
    import torch

    from align.data.prompts import load_prompts
    from align.generate import load_target

    teacher, tokenizer, _ = load_target(str(sft_run))
    student, _, _ = load_target(student_base)
    rows, _ = load_prompts("arith-prompts-eval")
    ids = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
           for r in rows]
    length = max({len(i) for i in ids}, key=[len(i) for i in ids].count)
    chosen = [(r, i) for r, i in zip(rows, ids, strict=True) if len(i) == length][:8]  # no padding anywhere
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r, _ in chosen))
    with torch.no_grad():
        batch = torch.tensor([i for _, i in chosen])
        student_lp, teacher_lp = (torch.log_softmax(m(input_ids=batch).logits[:, -1].float() / temperature, dim=-1)
                                  for m in (student, teacher))
    expected = float(divergence(student_lp, teacher_lp, kind, beta).mean())

    run = tmp_path / "run"
    code, _, err = cli("distill", "--model", student_base, "--teacher", sft_run, "--data", data, "--output", run,
                       "--divergence", kind, *(["--beta", str(beta)] if beta is not None else []), "--temperature",
                       str(temperature), "--batch-size", "8", "--max-completion-length", "1", "--max-steps", "1",
                       "--logging-steps", "1", "--no-tensorboard")
    assert code == 0, err
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert expected > 0.01 and first["loss"] == pytest.approx(expected, rel=1e-4), (first["loss"], expected)


def test_teacher_with_another_tokenizer_is_refused(cli, student_base, tmp_path):
    from align.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", vocab_size=600)
    code, _, err = cli("distill", "--model", student_base, "--teacher", other, "--output", tmp_path / "run", *COMMON)
    assert code == 2, err
    assert (f"--teacher {other}: its tokenizer (600 tokens) is not the student's (1024 tokens, from "
            f"{student_base})") in err
    assert "the teacher must use the student's tokenizer" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_options_are_refused_at_once(cli, student_base, tmp_path):
    missing = tmp_path / "no-teacher"
    code, _, err = cli("distill", "--model", student_base, "--teacher", missing, "--beta", "0.3", "--adapter", "prompt",
                       "--output", tmp_path / "run", *COMMON)
    assert code == 2
    assert f"--teacher {missing}: no such directory." in err
    assert "--beta 0.3 weighs the generalized JSD; --divergence reverse_kl has no β." in err
    assert "--adapter prompt: TRL's distillation loss runs the model's backbone directly" in err
    code, _, err = cli("distill", "--model", student_base, "--output", tmp_path / "run", *COMMON)
    assert code == 2 and "--teacher is required" in err
    assert not (tmp_path / "run").exists()


def test_pipeline_teacher_names_an_earlier_stage(tmp_path, tiny_model, student_base):
    import align
    from align.errors import AlignError

    stages = [{"name": "teacher", "kind": "sft", "data": "arith", "max_steps": 2, "packing": False},
              {"name": "student", "kind": "distill", "from": None, "model": student_base, "teacher": "teacher",
               "data": "arith-prompts", "max_steps": 1, "batch_size": 4, "max_completion_length": 4}]
    spec = {"model": tiny_model, "output": str(tmp_path / "p"), "defaults": {"tensorboard": False}, "stages": stages}
    with pytest.raises(AlignError) as refused:  # the teacher must come first, and be a policy
        align.run({**spec, "stages": stages[::-1]}, dry_run=True)
    assert "stage 'student': 'teacher' refers to a stage that comes later" in str(refused.value.problems)
    result = align.run(spec)
    assert [s["status"] for s in result["stages"]] == ["completed", "completed"]
    manifest = json.loads((tmp_path / "p" / "student" / "run.json").read_text())
    assert manifest["teacher"]["model"] == str((tmp_path / "p" / "teacher").resolve())
