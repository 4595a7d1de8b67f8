"""What leaves align loads elsewhere to the same outputs (align.export): every run directory, of every stage kind and
hand-off, loaded with plain transformers + PEFT by following its own adapter_config.json, computes the logits (or
reward scores) align computes; `align export` writes self-contained directories that do the same, and vLLM serves
the merged one with align's greedy output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HANG_S

PROMPT = [{"role": "user", "content": "What is 12 + 7?"}]
ANSWER = [{"role": "assistant", "content": "19"}]


@pytest.fixture(scope="module")
def children(sft_run, tmp_path_factory):
    """Short runs from the LoRA sft fixture: dpo both ways, kto, orpo, distill and grpo (continue), a reward model
    (always merged) and ppo (merged)."""
    import align

    out = tmp_path_factory.mktemp("export")
    common = dict(max_steps=2, logging_steps=1, tensorboard=False)
    runs = {"sft": sft_run}
    for handoff in ("continue", "merge"):
        runs[f"dpo-{handoff}"] = align.dpo(from_run=str(sft_run), data="arith-prefs", output=out / f"dpo-{handoff}",
                                           handoff=handoff, batch_size=4, **common)
    runs["kto"] = align.kto(from_run=str(sft_run), data="arith-prefs", output=out / "kto", batch_size=4, **common)
    runs["orpo"] = align.orpo(from_run=str(sft_run), data="arith-prefs", output=out / "orpo", batch_size=4, **common)
    runs["distill"] = align.distill(from_run=str(sft_run), teacher=str(sft_run), data="arith-prompts",
                                    output=out / "distill", batch_size=4, max_completion_length=4, **common)
    runs["grpo"] = align.grpo(from_run=str(sft_run), data="arith-prompts", reward=["accuracy"], output=out / "grpo",
                              batch_size=4, num_generations=2, max_completion_length=4, backend="hf", **common)
    runs["rm"] = align.rm(from_run=str(sft_run), data="arith-prefs", output=out / "rm", batch_size=4, **common)
    runs["ppo"] = align.ppo(from_run=str(sft_run), data="arith-prompts", reward_model=str(runs["rm"]),
                            output=out / "ppo", batch_size=4, max_completion_length=4, backend="hf", **common)
    return runs


def _inputs(tokenizer):
    text = tokenizer.apply_chat_template(PROMPT + ANSWER, tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


def _plain_peft(adapter_dir: Path, seq_cls: bool):
    """Load as a user would who has only transformers and PEFT: the base the adapter names, then the adapter."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    base = auto.from_pretrained(PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


@pytest.mark.parametrize("name", ["sft", "dpo-continue", "dpo-merge", "kto", "orpo", "distill", "grpo", "ppo"])
def test_policy_runs_load_in_plain_peft_to_aligns_logits(children, name):
    from align.handoff import load_run_policy

    model, tokenizer, manifest = load_run_policy(children[name])
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        got = _plain_peft(children[name] / "adapter", seq_cls=False)(**inputs).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert (children[name] / "base").is_dir() == bool(manifest["merged_adapters"]), "a base only for a merged chain"


def test_reward_model_scores_the_same_in_plain_peft(children):
    from align.rewards.reward_model import RewardModelScorer

    scorer = RewardModelScorer(children["rm"])
    wrong = [{"role": "assistant", "content": "91"}]
    expected = scorer.score([PROMPT, PROMPT], [ANSWER, wrong])
    model = _plain_peft(children["rm"] / "adapter", seq_cls=True)
    with torch.no_grad():
        got = [model(**_inputs_for(scorer.tokenizer, c)).logits[0, 0].item() for c in (ANSWER, wrong)]
    assert got == pytest.approx(expected, abs=1e-4)


def _inputs_for(tokenizer, completion):
    text = tokenizer.apply_chat_template(PROMPT + completion, tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "adapter"])
def test_export_is_self_contained(children, tmp_path, cli, merged):
    from align.handoff import load_run_policy

    out = tmp_path / "exported"
    code, _, err = cli("export", children["ppo"], "-o", out, *(["--merged"] if merged else []))
    assert code == 0, err
    model, tokenizer, _ = load_run_policy(children["ppo"])
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        if merged:
            from transformers import AutoModelForCausalLM

            exported = AutoModelForCausalLM.from_pretrained(out)
        else:
            exported = _plain_peft(out, seq_cls=False)
        got = exported(**inputs).logits
    assert (got - expected).abs().max().item() < 1e-4
    generation = json.loads(((out if merged else out / "base") / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert "{%" in json.loads((out / "tokenizer_config.json").read_text()).get("chat_template", "") or \
        (out / "chat_template.jinja").is_file()


def test_export_never_writes_into_the_run(children, cli):
    run = children["dpo-merge"]
    before = sorted(p.name for p in run.iterdir())
    code, _, err = cli("export", run, "-o", run / "exported", "--overwrite")
    assert code == 2 and "inside the run" in err and "--overwrite" not in err.split("inside the run")[1]
    code, _, err = cli("export", run, "-o", run, "--overwrite")
    assert code == 2
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.slow  # another engine start: `pytest -m slow` (CI)
def test_vllm_serves_the_export_with_aligns_greedy_output(children, tmp_path, cli):
    pytest.importorskip("vllm")
    out = tmp_path / "merged"
    assert cli("export", children["dpo-merge"], "-o", out, "--merged")[0] == 0
    code, expected, err = cli("generate", children["dpo-merge"], "--prompt", "What is 12 + 7?", "--max-new-tokens", "8",
                              "--temperature", "0")
    assert code == 0, err
    script = f"""
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model={str(out)!r}, gpu_memory_utilization=0.2, max_model_len=256, enforce_eager=True, seed=0)
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{{"role": "user", "content": "What is 12 + 7?"}}], tokenize=False,
                                   add_generation_prompt=True)
    out = llm.generate([text], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    print("VLLM:" + repr(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-3000:]
    served = eval(done.stdout.split("VLLM:")[-1].strip())
    assert served.strip() == expected.strip().splitlines()[-1].strip()
