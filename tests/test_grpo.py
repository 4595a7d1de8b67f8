"""`align grpo`: the KL to the parent is 0 at the first step, advantages are group-relative exactly as
documented, the reward rises on the toy task, and bad configs are refused at once."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

GRPO_ARGS = ["--data", "arith-prompts", "--num-generations", "4", "--batch-size", "8", "--max-completion-length", "6",
             "--backend", "hf", "--no-tensorboard"]


@pytest.fixture(scope="module")
def sft_parent(tiny_model, tmp_path_factory) -> Path:
    import align

    return align.sft(model=tiny_model, data="arith", output=tmp_path_factory.mktemp("grpo") / "sft", max_steps=150,
                     lr=3e-3, batch_size=32, packing=False, logging_steps=50, tensorboard=False)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_kl_to_the_parent_is_zero_at_the_first_step(cli, sft_parent, tmp_path):
    out = tmp_path / "grpo"
    code, _, err = cli("grpo", "--from", sft_parent, "--reward", "closeness(scale=50)", "--beta", "0.1", "--output", out,
                       "--max-steps", "2", "--logging-steps", "1", *GRPO_ARGS)
    assert code == 0, err
    first = _metrics(out)[0]
    assert first["step"] == 1 and first["kl"] == pytest.approx(0.0, abs=1e-6)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stage"] == "grpo" and manifest["parent"] == str(sft_parent.resolve())
    assert manifest["rewards"] == [{"name": "closeness", "spec": "closeness(scale=50)", "weight": 1.0}]


def test_group_advantages_match_a_hand_computation(sft_parent, tmp_path):
    from align.rewards.builtin import completion_text
    from align.stages.common import start_stage
    from align.stages.grpo import GRPOConfig, build_trainer, load_prompt_data

    cfg = GRPOConfig.from_kwargs(from_run=str(sft_parent), data="arith-prompts", reward=["reward_plugins:text_len@0.5"],
                                 output=str(tmp_path / "adv"), num_generations=4, batch_size=8, max_completion_length=6,
                                 temperature=1.0, backend="hf", tensorboard=False)
    started = start_stage(cfg, "grpo", load_prompt_data)
    trainer = build_trainer(cfg, started, callbacks=[])
    trainer.model.train()
    rows = started.train[:2]
    out = trainer._generate_and_score_completions([row for row in rows for _ in range(4)])
    texts = trainer.processing_class.batch_decode(out["completion_ids"], skip_special_tokens=True)
    rewards = [0.5 * len(completion_text(t)) for t in texts]
    expected = []
    for g in range(2):
        group = rewards[4 * g : 4 * g + 4]
        mean, std = statistics.fmean(group), statistics.stdev(group)  # Bessel-corrected, as documented
        expected += [(r - mean) / (std + 1e-4) for r in group]
    assert out["advantages"].tolist() == pytest.approx(expected, abs=1e-4)


def test_reward_rises_on_the_toy_task(cli, sft_parent, tmp_path):
    out = tmp_path / "learn"
    code, _, err = cli("grpo", "--from", sft_parent, "--reward", "closeness(scale=50)", "--output", out,
                       "--max-steps", "50", "--batch-size", "32", "--num-generations", "8", "--lr", "3e-3",
                       "--beta", "0", "--logging-steps", "5", "--data", "arith-prompts", "--max-completion-length", "6",
                       "--backend", "hf", "--no-tensorboard", "--seed", "0")
    assert code == 0, err
    rewards = [m["reward"] for m in _metrics(out) if "reward" in m]
    first, last = statistics.fmean(rewards[:2]), statistics.fmean(rewards[-3:])
    assert last > first + 0.15, rewards


def test_bad_grpo_config_is_refused_with_every_problem(cli, sft_parent, tmp_path):
    code, _, err = cli("grpo", "--from", sft_parent, "--data", "arith-prompts", "--output", tmp_path / "x",
                       "--reward", "acuracy", "--num-generations", "3", "--batch-size", "8")
    assert code == 2
    assert "Unknown reward 'acuracy'. Did you mean 'accuracy'?" in err
    assert "--batch-size 8 must be a multiple of --num-generations 3" in err
    assert "Invalid reward spec" not in err  # the spec problems are bullets of their own, not under a bullet heading
    code, _, err = cli("grpo", "--from", sft_parent, "--data", "arith-prompts", "--output", tmp_path / "x")
    assert code == 2 and "Give at least one reward" in err
    assert not (tmp_path / "x").exists()
