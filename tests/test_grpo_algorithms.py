"""`align grpo`'s algorithm options against hand computations: the RLOO and REINFORCE++ advantage estimators (pure
functions and through the trainer), GSPO's sequence-level ratio in the loss, the rollout-correction weights
(TIS/MIS, token and sequence level), and the options' validation."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from align.stages.advantages import group_advantages, importance_weights

REWARDS = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0]  # two groups of 4


def _std(xs):
    return statistics.stdev(xs)


def test_rloo_advantage_is_reward_minus_the_mean_of_the_others():
    got = group_advantages(torch.tensor(REWARDS), 4, "rloo", "none").tolist()
    expected = []
    for g in (REWARDS[:4], REWARDS[4:]):
        expected += [r - (sum(g) - r) / 3 for r in g]
    assert got == pytest.approx(expected)
    assert got[0] == pytest.approx(2 / 3) and got[7] == pytest.approx(3.0)  # k/(k-1)·(r - mean) = 4/3·2.25
    scaled = group_advantages(torch.tensor(REWARDS), 4, "rloo", "group").tolist()
    assert scaled[:4] == pytest.approx([e / (_std(REWARDS[:4]) + 1e-4) for e in expected[:4]])


def test_reinforce_pp_is_a_group_baseline_normalised_over_the_batch():
    centred = []
    for g in (REWARDS[:4], REWARDS[4:]):
        centred += [r - statistics.fmean(g) for r in g]
    mean, std = statistics.fmean(centred), _std(centred)
    expected = [(c - mean) / (std + 1e-4) for c in centred]
    assert group_advantages(torch.tensor(REWARDS), 4, "reinforce_pp", "batch").tolist() == pytest.approx(expected)


def test_unscorable_completions_get_zero_advantage_and_are_left_out_of_the_baseline():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    got = group_advantages(rewards, 4, "rloo", "none").tolist()
    assert got == pytest.approx([1.0, 0.0, -0.5, -0.5])  # baselines over the 2 other scored completions


def test_importance_weights_truncate_or_mask_per_token_or_sequence():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    sampler = torch.tensor([[-1.0, -3.5, -0.4, 0.0], [-2.5, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    raw = [[1.0, math.exp(1.5), math.exp(-0.1), 1.0], [math.exp(1.5), 1.0, 1.0, 1.0]]
    w, cut = importance_weights(trainer, sampler, mask, "token_truncate", high=3.0)
    assert w.flatten().tolist() == pytest.approx([min(x, 3.0) for row in raw for x in row])
    assert cut.item() == pytest.approx(2 / 5)  # e^1.5 = 4.48 > 3 on 2 of the 5 real tokens
    w, cut = importance_weights(trainer, sampler, mask, "token_mask", high=3.0, low=0.95)
    assert w.flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])  # e^-0.1 = 0.905 < 0.95
    assert cut.item() == pytest.approx(3 / 5)
    seq = [math.exp(1.5 - 0.1), math.exp(1.5)]  # exp Σ_t (log π_trainer − log π_sampler) per sequence
    w, cut = importance_weights(trainer, sampler, mask, "sequence_truncate", high=4.2)
    assert w.flatten().tolist() == pytest.approx([min(s, 4.2) for s in seq]) and cut.item() == pytest.approx(0.5)
    w, cut = importance_weights(trainer, sampler, mask, "sequence_mask", high=4.2)
    assert w.flatten().tolist() == pytest.approx([seq[0], 0.0])


def _trainer(sft_run, tmp_path, **options):
    from align.stages.common import start_stage
    from align.stages.grpo import GRPOConfig, build_trainer, load_prompt_data

    cfg = GRPOConfig.from_kwargs(from_run=str(sft_run), data="arith-prompts", reward=["reward_plugins:text_len@0.5"],
                                 output=str(tmp_path / "run"), num_generations=4, batch_size=8, max_completion_length=6,
                                 temperature=1.0, backend="hf", tensorboard=False, beta=0.0, **options)
    started = start_stage(cfg, "grpo", load_prompt_data)
    trainer = build_trainer(cfg, started, callbacks=[])
    trainer.model.train()
    rows = [row for row in started.train[:2] for _ in range(4)]
    return trainer, rows


@pytest.mark.parametrize("advantage", ["rloo", "reinforce_pp"])
def test_the_trainer_uses_the_chosen_estimator(sft_run, tmp_path, advantage):
    from align.rewards.builtin import completion_text

    trainer, rows = _trainer(sft_run, tmp_path, advantage=advantage)
    out = trainer._generate_and_score_completions(rows)
    texts = trainer.processing_class.batch_decode(out["completion_ids"], skip_special_tokens=True)
    rewards = [0.5 * len(completion_text(t)) for t in texts]
    expected = group_advantages(torch.tensor(rewards), 4, advantage, "none" if advantage == "rloo" else "batch")
    assert out["advantages"].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    if advantage == "rloo":  # and by hand
        for g in range(2):
            group = rewards[4 * g : 4 * g + 4]
            assert out["advantages"][4 * g : 4 * g + 4].tolist() == pytest.approx(
                [r - (sum(group) - r) / 3 for r in group], abs=1e-5)


def test_gspo_uses_one_clipped_ratio_per_sequence(sft_run, tmp_path):
    trainer, rows = _trainer(sft_run, tmp_path, importance_sampling_level="sequence", epsilon=0.2)
    assert trainer.loss_type == "grpo"  # GSPO's per-sequence objective is the default loss at sequence level
    out = trainer._generate_and_score_completions(rows)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                                 out["completion_ids"].size(1))
    mask = out["completion_mask"].float()
    generator = torch.Generator().manual_seed(0)
    out["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=generator)
    out["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 1.0])
    trainer.model.eval()  # no gradient-accumulation normaliser (dropout is off in both modes)
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, out).item()
    expected = []
    for i in range(len(mask)):
        n = mask[i].sum()
        ratio = math.exp(float(((logps[i] - out["old_per_token_logps"][i]) * mask[i]).sum() / n))
        a = float(out["advantages"][i])
        expected.append(-min(ratio * a, min(max(ratio, 0.8), 1.2) * a))
    assert loss == pytest.approx(statistics.fmean(expected), rel=1e-4)


def test_algorithm_options_are_validated(cli, sft_run, tmp_path):
    base = ["grpo", "--from", sft_run, "--data", "arith-prompts", "--reward", "accuracy", "--output", tmp_path / "x",
            "--backend", "hf"]
    code, _, err = cli(*base, "--advantage", "reinforce_pp", "--scale-rewards", "group", "--is-correction",
                       "token_mask", "--sync-check", "2", "--is-min", "5")
    assert code == 2
    assert "--advantage reinforce_pp normalises over the batch by definition" in err
    assert "--is-correction token_mask needs the sampler's log-probs: the hf backend samples from the trained model" in err
    assert "--sync-check compares the vllm sampler with the trainer" in err
    assert "--is-cap must be > 0 and --is-min in [0, --is-cap), got 3.0 and 5.0" in err
    assert not (tmp_path / "x").exists()
