"""RLHF on its own reward model (issue 18), CI-sized, on the bundled `reviews` task: an sft policy writes product
reviews, on-policy pairs from it are labelled by the `positive` verifier (as a human labeller would), a reward model
learns from those pairs alone, and ppo trained on that reward model alone — the verifier never enters its loss —
raises the verifier's held-out score (gold) over the sft parent. The demo's five-seed table is bench/demo_seeds.py's,
not a test's."""

from __future__ import annotations

import json

import pytest

# held-out gold: the verifier's mean over 4 sampled reviews of each of 64 held-out prompts (temperature 1: the policy's
# own distribution, which ppo optimises; greedy moves only where a product's sft share of positive words is near 1/2)
EVAL = {"data": "reviews-eval", "max_samples": 64, "max_new_tokens": 16, "batch_size": 256, "temperature": 1.0,
        "num_samples": 4, "reward": ["positive"]}


@pytest.fixture(scope="module")
def pipeline(tiny_model, tmp_path_factory):
    """sft → pairs (+ held-out pairs, only to measure the rm) → rm → ppo on the rm alone, small."""
    from align.pipeline import run_pipeline

    fast = {"tensorboard": False, "logging_steps": 5}
    sampling = {"num_generations": 8, "temperature": 1.0, "max_completion_length": 16, "reward": ["positive"]}
    out = tmp_path_factory.mktemp("rlhf") / "pipe"
    result = run_pipeline({
        "model": tiny_model, "output": str(out), "seed": 0, "eval": EVAL,
        "stages": [
            {"name": "sft", "kind": "sft", "data": "reviews", "adapter": "full", "lr": 3e-3, "batch_size": 8,
             "max_length": 256, "max_steps": 150, **fast},
            {"name": "pairs", "kind": "pairs", "data": "reviews-prompts", "max_prompts": 96, **sampling},
            {"name": "heldout-pairs", "kind": "pairs", "data": "reviews-eval", "max_prompts": 48, **sampling},
            {"name": "rm", "kind": "rm", "from": "sft", "data": "pairs", "eval_data": "heldout-pairs", "lr": 3e-3,
             "batch_size": 16, "max_steps": 120, **fast},
            {"name": "ppo", "kind": "ppo", "from": "sft", "data": "reviews-prompts", "reward_model": "rm",
             "lr": 3e-4, "batch_size": 32, "max_completion_length": 16, "kl_coef": 0.05, "max_steps": 12,
             "backend": "hf", **fast},
        ]})
    return out, {row["stage"]: row for row in result["table"]}


@pytest.mark.slow  # a learning check: sft -> pairs -> rm -> ppo on the reviews task
def test_ppo_on_the_reward_model_alone_raises_held_out_gold(pipeline):
    out, rows = pipeline
    assert rows["rm"]["preference_accuracy"] >= 0.75  # judging is easy here: it tells positive reviews from the rest
    sft, ppo = rows["sft"]["reward"], rows["ppo"]["reward"]  # mean `positive` over sampled held-out reviews
    assert sft < 0.6, "the sft parent leaves room to learn"
    assert ppo >= sft + 0.08, (sft, ppo)  # measured: 26.6% -> 43.4% (+16.8 points; rm 82.9%), 2026-12-02
    assert rows["ppo"]["kl"] > 0
    manifest = json.loads((out / "ppo" / "run.json").read_text())
    assert manifest["config"]["reward"] == [] and manifest["config"]["gold_reward"] == ["positive"]
    records = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert any("gold/positive/mean" in r for r in records)  # logged beside the proxy, never its reward


def test_reviews_data_is_the_generator_output_and_held_out_prompts_are_kept_apart():
    from align.data.samples import bundled_path, review_records

    records = review_records()
    for name, rows in zip(("reviews", "reviews-prompts", "reviews-eval"), records, strict=True):
        assert bundled_path(name).read_text() == "".join(json.dumps(r) + "\n" for r in rows), name
    sft, prompts, held = records
    trained = {c["messages"][0]["content"] for c in sft} | {r["prompt"] for r in prompts}
    assert len(held) == 150 and not trained & {r["prompt"] for r in held}
    unseen = {r["product"] for r in held} - {r["product"] for r in prompts}
    assert unseen == {"rake"}  # all other held-out prompts ask in a new phrasing about a product seen in training


def test_review_bands_change_the_sft_reviews_only():
    """The products' shares of positive adjectives (review_records(bands=...)) set how positive the SFT reviews are;
    the RL and held-out prompts stay the same, so a retuned task never trains on what it is measured on."""
    from align.data.samples import review_records
    from align.rewards.builtin import positive

    def positive_share(sft):
        prompts = [c["messages"][0]["content"] for c in sft]
        reviews = [c["messages"][1]["content"] for c in sft]
        products = [p.rstrip(".?").split()[-1] for p in prompts]
        return sum(positive()(prompts, reviews, product=products)) / len(sft)

    low_sft, low_prompts, low_held = review_records(bands=((1.0, 0.1, 0.3),))
    high_sft, high_prompts, high_held = review_records(bands=((1.0, 0.7, 0.9),))
    assert (low_prompts, low_held) == (high_prompts, high_held)
    assert positive_share(low_sft) < 0.1 < 0.5 < positive_share(high_sft)
