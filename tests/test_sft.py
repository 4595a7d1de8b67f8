"""`align sft` end to end: every adapter kind trains, saves and reloads to the same model; packing is exact;
merge equals the adapter model; resume continues from the checkpoint; the toy task is learned."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import completion_loss, kill_at_checkpoint

from align.data import load_examples
from align.handoff import load_run_policy
from align.models import load_base_model, load_tokenizer

ADAPTER_CASES = {
    "lora": [], "qlora": [], "dora": [], "rslora": [], "ia3": [], "loha": [], "lokr": [], "vera": [],
    "prompt": [], "prompt-text": ["--adapter", "prompt", "--prompt-init-text", "What is the answer"],
    "prefix": [], "ptuning-mlp": ["--adapter", "ptuning", "--encoder-type", "mlp"],
    "ptuning-lstm": ["--adapter", "ptuning", "--encoder-type", "lstm"], "full": [],
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_every_adapter_trains_saves_and_reloads_identically(cli, tiny_model, tmp_path, data_dir, case):
    extra = ADAPTER_CASES[case] or ["--adapter", case]
    run = tmp_path / "run"
    code, out, err = cli("sft", "--model", tiny_model, "--data", "arith", "--eval-data", data_dir / "messages.jsonl",
                         "--output", run, "--max-steps", "3", "--batch-size", "4", "--max-length", "128",
                         "--lr", "1e-2", "--no-tensorboard", *extra)
    assert code == 0, err
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["stage"] == "sft"
    assert manifest["datasets"]["train"]["sha256"] and manifest["versions"]["trl"]
    weights = run / ("model" if case == "full" else "adapter")
    assert (weights / "tokenizer_config.json").is_file()
    if case != "full":
        assert (weights / "adapter_config.json").is_file() and (weights / "adapter_model.safetensors").is_file()

    # the saved artifact is the trained model: its loss on the eval set equals the loss logged in memory
    model, tokenizer, _ = load_run_policy(run)
    examples, _, _ = load_examples(str(data_dir / "messages.jsonl"))
    reloaded = completion_loss(model, tokenizer, examples)
    assert reloaded == pytest.approx(manifest["metrics"]["eval_loss"], abs=1e-4)
    base = completion_loss(load_base_model(tiny_model), load_tokenizer(tiny_model), examples)
    assert abs(reloaded - base) > 1e-4, "the saved adapter must not be a no-op"


def test_packed_rows_give_the_same_loss_as_separate_examples(tiny_model):
    from align.data.chat import encode_dataset
    from align.data.packing import PackedRowCollator, pack_rows

    tokenizer, model = load_tokenizer(tiny_model), load_base_model(tiny_model).eval()
    examples, _, _ = load_examples("arith")
    ds = encode_dataset(examples[:12], tokenizer)
    packed = pack_rows(ds, 128)
    assert len(packed) < len(ds)
    batch = PackedRowCollator(tokenizer.pad_token_id)(list(packed))
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_loss = model(**batch, use_cache=False).loss.item()  # as TRL calls it when training
    assert packed_loss == pytest.approx(completion_loss(model, tokenizer, examples[:12]), abs=1e-5)


def test_sft_learns_the_toy_task(sft_run, tiny_model):
    examples, _, _ = load_examples("arith-eval")
    before = completion_loss(load_base_model(tiny_model), load_tokenizer(tiny_model), examples)
    model, tokenizer, manifest = load_run_policy(sft_run)
    after = completion_loss(model, tokenizer, examples)
    assert after == pytest.approx(manifest["metrics"]["eval_loss"], abs=1e-4)
    assert after < 0.5 * before, f"eval loss {before:.3f} -> {after:.3f}"


def test_merge_equals_adapter_model(cli, sft_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, _, err = cli("merge", sft_run, "--output", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    model, _, _ = load_run_policy(sft_run)
    batch = tokenizer(["What is 12 + 7?", "hello world"], return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (model.eval()(**batch).logits - merged(**batch).logits).abs().max().item()
    assert diff < 1e-4
    code, _, err = cli("merge", sft_run, "--output", tmp_path / "merged")
    assert code == 2 and "--overwrite" in err


def test_prompt_adapter_cannot_be_merged(cli, tiny_model, tmp_path):
    code, _, _ = cli("sft", "--model", tiny_model, "--data", "arith", "--output", tmp_path / "p", "--adapter", "prompt",
                     "--max-steps", "1", "--no-tensorboard")
    assert code == 0
    code, _, err = cli("merge", tmp_path / "p", "-o", tmp_path / "m")
    assert code == 2 and "cannot be merged" in err and not (tmp_path / "m").exists()


def test_generate_is_greedy_and_deterministic(cli, sft_run):
    first = cli("generate", sft_run, "--prompt", "What is 3 + 4?", "--max-new-tokens", "5")
    second = cli("generate", sft_run, "--prompt", "What is 3 + 4?", "--max-new-tokens", "5")
    assert first[0] == 0 and first[1] == second[1]


def test_data_inspect_shows_format_marks_and_truncation(cli, tiny_model):
    code, out, _ = cli("data", "inspect", "arith", "--model", tiny_model, "--max-length", "20")
    assert code == 0
    assert "format:   messages" in out and "examples: 2000" in out
    assert "[[" in out and "<|im_end|>" in out.split("[[", 1)[1]  # the end-of-turn token is trained on
    assert "truncated at --max-length 20:" in out and "of 2000 examples" in out


@pytest.mark.parametrize(("data", "kind", "stages"), [
    ("arith-prefs", "preference pairs", "dpo, orpo, simpo, rm"), ("arith-prefs", "preference pairs", "kto (as unpaired feedback)"),
    ("arith-prompts", "prompts", "grpo, ppo, pairs")])
def test_data_inspect_reads_what_each_stage_reads(cli, tiny_model, data, kind, stages):
    code, out, err = cli("data", "inspect", data, "--model", tiny_model)
    assert code == 0, err
    assert f"format:   {kind}" in out and f"({'as ' + kind})" in out and stages in out.split("usable by:")[1]
    assert "tokens per example" in out


def test_data_inspect_names_every_readers_reason_when_none_can_read(cli, data_dir):
    code, _, err = cli("data", "inspect", data_dir / "unknown_format.jsonl")
    assert code == 2 and "no stage can read this dataset" in err
    assert all(f"as {kind}" in err for kind in ("conversations", "preference pairs", "prompts"))


def test_resume_after_kill_continues_from_checkpoint(cli, tiny_model, tmp_path):
    run = tmp_path / "run"
    args = ["sft", "--model", tiny_model, "--data", "arith", "--output", str(run), "--batch-size", "4",
            "--no-packing", "--save-steps", "10", "--logging-steps", "1", "--no-tensorboard"]
    # lost: it logs a few steps past the checkpoint, which resuming must discard
    kill_at_checkpoint([sys.executable, "-m", "align", *args, "--max-steps", "5000"], run, 10, lost=3)

    code, _, err = cli(*args, "--max-steps", "30", "--resume")
    assert code == 0, err
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["resumed_at"]) == 1
    steps = [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == list(range(1, 31)), "steps 1-10 from the first process, 11-30 after resuming, no duplicates"
    state = json.loads((run / "checkpoints" / "checkpoint-30" / "trainer_state.json").read_text())
    assert state["global_step"] == 30
