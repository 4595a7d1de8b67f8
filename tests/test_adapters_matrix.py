"""Every adapter kind × every stage, and every kind as the parent of the next stage (issue #11).

One SFT parent per kind (two steps on 8 examples, a high learning rate so it moves) is shared by all cells. Cells:

- sft: finite loss; the saved adapter reloads to the model that was trained (its eval loss equals the trainer's),
  and `align generate` / `align eval` read it;
  only the adapter moved (adapters disabled — or the non-adapter weights — equal the base; full moves the base);
  `align merge` gives the same logits (1e-4) where the kind is mergeable, and is refused (exit 2) where not.
- rm (from the base, on pairs and — pointwise — on labelled rows), dpo from the parent with `--handoff continue`
  and with `--handoff merge`, and kto, orpo, simpo, grpo, ppo and distill continuing the parent: two steps with a
  finite loss, the child starts at its parent (DPO: loss ln 2 and margins 0; KTO: loss 1/2, every reward and the KL
  baseline 0; GRPO/PPO: KL 0), the child moved away from its parent, and its run reloads. orpo and simpo have no
  reference and distill's teacher (the tiny base) is not the parent, so their first step has no fixed value.
- A combination that cannot work is refused at validation: exit 2, a message naming the kind and the reason, and
  no run directory written.

Every outcome is recorded; with ALIGN_MATRIX_JSON=FILE the outcomes are merged into that file (docs/make_adapters.py
renders docs/ADAPTERS.md from it, and can rerun only some columns: `--only "kto or distill"`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import completion_loss

from align.adapters import ADAPTERS
from align.data import load_examples
from align.handoff import load_run_policy
from align.models import load_base_model
from align.native_adapters import state_dict as native_state_dict

KINDS = list(ADAPTERS)
# quick suite: lora, qlora and prompt (most refusals); every other kind's row runs in `pytest -m slow` (CI)
QUICK_KINDS = ("lora", "qlora", "prompt")
KIND_PARAMS = [k if k in QUICK_KINDS else pytest.param(k, marks=pytest.mark.slow) for k in KINDS]
STAGES = ["rm", "rm-pointwise", "dpo-continue", "dpo-merge", "kto", "orpo", "simpo", "grpo", "ppo", "distill"]
COMMON = ["--max-steps", "2", "--batch-size", "4", "--logging-steps", "1", "--max-length", "96", "--no-tensorboard"]
# refused combinations and a word their message must contain (besides the kind's name)
REFUSED = {
    **{(k, "ppo"): "ppo" for k in ("prompt", "prefix", "ptuning", "bitfit", "bottleneck", "loraplus", "adalora")},
    **{(k, "dpo-merge"): "cannot be merged" for k in ("prompt", "prefix", "ptuning")},
    **{(k, stage): "labels of the text alone" for k in ("prompt", "ptuning") for stage in ("orpo", "simpo")},
    **{(k, "distill"): "virtual tokens" for k in ("prompt", "prefix", "ptuning")},
}
NOT_MERGEABLE = {"prompt": "virtual tokens", "prefix": "virtual tokens", "ptuning": "virtual tokens",
                 "bottleneck": "adds modules", "bitfit": "added biases"}
OUTCOMES: dict[str, dict] = {}
SAMPLE = torch.tensor([[5, 17, 33, 60, 101, 7, 250, 12]])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is 3-4x faster than two that wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def matrix(tmp_path_factory) -> dict[str, Path]:
    """Small data files (8 rows each) and a reward with spread (completion length in characters)."""
    root = tmp_path_factory.mktemp("matrix")
    out = {"root": root}
    for name, sample in (("sft", "arith"), ("prefs", "arith-prefs"), ("prompts", "arith-prompts")):
        from align.data.samples import bundled_path

        lines = Path(bundled_path(sample)).read_text().splitlines()[:8]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        out[name] = root / f"{name}.jsonl"
    pairs = [json.loads(line) for line in out["prefs"].read_text().splitlines()[:4]]
    labelled = [{"text": f"{p['prompt']} {p[answer]}", "label": int(answer == "chosen")}
                for p in pairs for answer in ("chosen", "rejected")]
    (root / "labelled.jsonl").write_text("".join(json.dumps(row) + "\n" for row in labelled))
    out["labelled"] = root / "labelled.jsonl"
    (root / "reward.py").write_text("def chars(prompts, completions, **kw):\n"
                                    "    return [float(len(str(c))) / 10 for c in completions]\n")
    out["reward"] = f"{root / 'reward.py'}:chars"
    yield out
    target = os.environ.get("ALIGN_MATRIX_JSON")
    if target:  # merged into what is there: a run of some columns (-k) keeps the others
        old = json.loads(Path(target).read_text()) if Path(target).is_file() else {}
        Path(target).write_text(json.dumps({**old, **OUTCOMES}, indent=1, sort_keys=True) + "\n")


_PARENTS: dict[str, Path] = {}


def parent(kind: str, matrix, tiny_model) -> Path:
    """The shared SFT run of `kind` (built on first use)."""
    from align.cli import main

    if kind not in _PARENTS:
        out = matrix["root"] / f"sft-{kind}"
        code = main([str(a) for a in ["sft", "--model", tiny_model, "--data", matrix["sft"], "--eval-data",
                                      matrix["sft"], "--eval-batch-size", "8", "--output", out, "--adapter", kind, "--lr", "2e-2",
                                      "--no-packing", *COMMON]])
        assert code == 0, f"sft --adapter {kind} failed"
        _PARENTS[kind] = out
    return _PARENTS[kind]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _logits(model) -> torch.Tensor:
    """Logits of the sample's own positions (prompt tuning prepends its virtual tokens)."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=SAMPLE).logits.float()[:, -SAMPLE.shape[1]:]


def _record(kind: str, stage: str, outcome: str, detail: str = "", run: Path | None = None) -> None:
    if outcome == "refused":  # the reason, without the command's prefix and this session's paths
        detail = detail.strip().splitlines()[-1].strip().removeprefix("- ").split("error: ", 1)[-1]
        detail = detail.replace(str(run), "RUN") if run else detail
    OUTCOMES[f"{kind}|{stage}"] = {"kind": kind, "stage": stage, "outcome": outcome, "detail": detail}


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_sft(kind, matrix, tiny_model, cli, tmp_path):
    run = parent(kind, matrix, tiny_model)
    manifest = json.loads((run / "run.json").read_text())
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)

    # save -> reload is the trained model: the reloaded eval loss equals the trainer's own
    model, tokenizer, _ = load_run_policy(run)
    examples, _, _ = load_examples(str(matrix["sft"]))
    assert completion_loss(model, tokenizer, examples) == pytest.approx(manifest["metrics"]["eval_loss"], abs=1e-4)

    # only the adapter moved
    spec = ADAPTERS[kind]
    base = load_base_model(tiny_model, quantize_4bit=spec.quantize_4bit)
    trained = _logits(model)
    assert not torch.allclose(trained, _logits(base), atol=1e-5), "training moved nothing"
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            assert torch.allclose(_logits(model), _logits(base), atol=1e-5), "the base weights changed"
    elif spec.native:
        base_weights = dict(base.named_parameters())
        trained_names = set(native_state_dict(model))
        for name, value in model.named_parameters():
            if name in base_weights and name not in trained_names:
                assert torch.equal(value, base_weights[name]), f"{name} changed"

    # align generate and align eval read the saved directory
    code, _, err = cli("generate", run, "--prompt", "What is 1 + 1?", "--max-new-tokens", "2")
    assert code == 0, err
    code, _, err = cli("eval", run, "--data", matrix["prompts"], "--max-samples", "2", "--max-new-tokens", "2",
                       "--backend", "hf")
    assert code == 0, err

    # merge where mergeable, refused (exit 2, naming the kind and the reason) where not
    code, _, err = cli("merge", run, "--output", tmp_path / "merged")
    if kind in NOT_MERGEABLE:
        assert code == 2 and kind in err and NOT_MERGEABLE[kind] in err, err
        _record(kind, "merge", "refused", err, run)
    else:
        assert code == 0, err
        reference = _logits(load_run_policy(run, dequantize=True)[0]) if spec.quantize_4bit else trained
        assert torch.allclose(_logits(load_base_model(str(tmp_path / "merged"))), reference, atol=1e-4)
        _record(kind, "merge", "ok")
    _record(kind, "sft", "ok", f"loss {losses[0]:.3f} → {losses[1]:.3f}")


def _stage_command(stage: str, kind: str, run: Path, out: Path, matrix, tiny_model) -> list:
    if stage.startswith("rm"):
        data = matrix["labelled"] if stage == "rm-pointwise" else matrix["prefs"]
        return ["rm", "--model", tiny_model, "--adapter", kind, "--data", data, "--output", out, *COMMON]
    if stage.startswith("dpo"):
        return ["dpo", "--from", run, "--handoff", stage.split("-")[1], "--data", matrix["prefs"], "--output", out,
                *COMMON]
    if stage in ("kto", "orpo", "simpo"):
        return [stage, "--from", run, "--handoff", "continue", "--data", matrix["prefs"], "--output", out, *COMMON]
    if stage == "distill":  # the teacher is the tiny base: not the parent, so there is something to learn
        return ["distill", "--from", run, "--handoff", "continue", "--teacher", tiny_model, "--data", matrix["prompts"],
                "--max-completion-length", "8", "--output", out, *COMMON]
    rl = ["--from", run, "--handoff", "continue", "--data", matrix["prompts"], "--reward", matrix["reward"],
          "--max-completion-length", "8", "--output", out, *COMMON]
    return ["grpo", *rl, "--num-generations", "2"] if stage == "grpo" else ["ppo", *rl, "--num-generations", "2"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_stage(kind, stage, matrix, tiny_model, cli):
    run = parent(kind, matrix, tiny_model) if not stage.startswith("rm") else None
    out = matrix["root"] / f"{stage}-{kind}"
    code, _, err = cli(*_stage_command(stage, kind, run, out, matrix, tiny_model))
    if (kind, stage) in REFUSED:
        assert code == 2, err
        assert f"'{kind}'" in err or f"--adapter {kind}" in err, err
        assert REFUSED[kind, stage] in err and "Traceback" not in err, err
        assert not out.exists(), "nothing is written for a refused run"
        _record(kind, stage, "refused", err, run)
        return
    assert code == 0, err
    first = _metrics(out)[0]
    loss = first.get("loss", first.get("loss/policy_avg"))
    assert loss is not None and math.isfinite(loss), first
    detail = ""
    if stage.startswith("dpo"):  # the reference is the parent policy: the child starts exactly there
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-3) and abs(first["rewards/margins"]) <= 2e-4, first
        detail = f"first loss {first['loss']:.4f}"
    elif stage == "kto":  # policy = reference: every reward and the KL baseline are 0, the loss (1 + 1) / 4
        rewards = [first[k] for k in first if k.startswith("rewards/") or k == "kl"]
        assert first["loss"] == pytest.approx(0.5, abs=1e-4) and rewards and max(map(abs, rewards)) <= 2e-4, first
        detail = f"first loss {first['loss']:.4f}"
    elif stage in ("orpo", "simpo", "distill", "rm-pointwise"):
        detail = f"first loss {loss:.4f}"
    elif stage in ("grpo", "ppo"):
        kl = first["kl"] if stage == "grpo" else first["objective/kl"]
        assert abs(kl) < 1e-4, first
        detail = f"first KL {kl:.1e}"
    child = load_run_policy(out)[0]
    if not stage.startswith("rm"):
        assert not torch.allclose(_logits(child), _logits(load_run_policy(run)[0]), atol=0), "the child did not train"
    trained = json.loads((out / "run.json").read_text())["adapter"]
    if trained != kind:  # e.g. a full parent is merged and the child trains a fresh lora
        detail = f"trains {trained} on the merged parent" + (f"; {detail}" if detail else "")
    _record(kind, stage, "ok", detail)


@pytest.mark.parametrize("variant", [["prompt", "--prompt-init-text", "What is the answer"],
                                     ["prefix", "--prefix-projection"], ["ptuning", "--encoder-type", "lstm"]])
def test_prompt_learning_variants_continue_exactly(variant, matrix, tiny_model, cli, tmp_path):
    """Text-initialised prompts, the P-tuning v2 prefix MLP and the LSTM prompt encoder: the continued child trains the
    saved virtual tokens and starts at its parent (DPO's first loss ln 2)."""
    kind, *options = variant
    code, _, err = cli("sft", "--model", tiny_model, "--data", matrix["sft"], "--output", tmp_path / "sft", "--adapter",
                       kind, *options, "--lr", "2e-2", *COMMON)
    assert code == 0, err
    code, _, err = cli("dpo", "--from", tmp_path / "sft", "--data", matrix["prefs"], "--output", tmp_path / "dpo",
                       *COMMON)
    assert code == 0, err
    first = _metrics(tmp_path / "dpo")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3) and abs(first["rewards/margins"]) <= 2e-4, first
    assert not torch.allclose(_logits(load_run_policy(tmp_path / "dpo")[0]), _logits(load_run_policy(tmp_path / "sft")[0]))


def test_lomo_trains_full_fine_tuning_and_is_refused_with_an_adapter(matrix, tiny_model, cli, tmp_path):
    pytest.importorskip("lomo_optim")
    out = tmp_path / "lomo"
    code, _, err = cli("sft", "--model", tiny_model, "--data", matrix["sft"], "--output", out, "--adapter", "full",
                       "--full-optimizer", "lomo", "--lr", "1e-3", "--no-packing", *COMMON)
    assert code == 0, err
    assert all(math.isfinite(m["loss"]) for m in _metrics(out) if "loss" in m)
    assert not torch.allclose(_logits(load_run_policy(out)[0]), _logits(load_base_model(tiny_model)))
    code, _, err = cli("sft", "--model", tiny_model, "--data", matrix["sft"], "--output", tmp_path / "x",
                       "--adapter", "lora", "--full-optimizer", "lomo", *COMMON)
    assert code == 2 and "--full-optimizer lomo" in err and "'lora'" in err, err
    if not torch.cuda.is_available():
        code, _, err = cli("sft", "--model", tiny_model, "--data", matrix["sft"], "--output", tmp_path / "y",
                           "--adapter", "full", "--full-optimizer", "adalomo", *COMMON)
        assert code == 2 and "adalomo" in err and "CUDA" in err, err


def test_full_fine_tuning_and_native_kinds_are_refused_by_ppo_from_a_base(tiny_model, matrix, cli, tmp_path):
    for kind in ("full", "bitfit"):
        code, _, err = cli("ppo", "--model", tiny_model, "--adapter", kind, "--data", matrix["prompts"], "--reward",
                           matrix["reward"], "--output", tmp_path / kind, *COMMON)
        assert code == 2 and f"--adapter {kind}" in err and "ppo" in err and "Traceback" not in err, err
        assert not (tmp_path / kind).exists()


def test_every_adapter_option_has_help(cli):
    code, out, _ = cli("sft", "--help")
    assert code == 0
    for flag in ("--loraplus-lr-ratio", "--adalora-target-r", "--oft-block-size", "--boft-block-size",
                 "--bottleneck-reduction", "--full-optimizer", "bitfit", "bottleneck", "adalora"):
        assert flag in out, flag
