"""Reward specs of every kind, settings and weights, async rewards, and faults that name the function and
the sample; `align rewards check`."""

from __future__ import annotations

import pytest

from align.errors import AlignError
from align.rewards import GuardedReward, RewardError, resolve_rewards, weighted_total
from align.rewards.builtin import accuracy, format, length

PROMPTS = ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"]
COMPLETIONS = ["2", "The answer is <answer>4</answer>", "boom"]


def score(spec: str, completions=COMPLETIONS, **kwargs):
    (reward,) = resolve_rewards([spec])
    return GuardedReward(reward, **kwargs)(PROMPTS[: len(completions)], completions, answer=["2", "4", "6"][: len(completions)])


def test_builtin_accuracy_format_and_length():
    acc = accuracy()
    assert acc(PROMPTS, ["2", "The answer is <answer>4</answer>", "7"], answer=["2", "4", "6"]) == [1.0, 1.0, 0.0]
    assert acc(PROMPTS[:1], ["It is 2.0"], answer=[None]) == [None]
    assert accuracy(mode="exact")(PROMPTS[:2], ["2", "2.0"], answer=["2", "2"]) == [1.0, 0.0]
    messages = [[{"role": "assistant", "content": "<think>x</think> <answer>4</answer>"}]]
    assert format()(PROMPTS[:1], messages) == [1.0] and format()(PROMPTS[:1], ["4"]) == [0.0]
    ids = [[0] * 4, [0] * 7, [0] * 9]
    assert length(max_length=8, cache=4)(PROMPTS, ["", "", ""], completion_ids=ids) == [0.0, -0.75, -1.0]


def test_spec_kinds_module_file_and_builtin_with_settings_and_weights(tmp_path):
    assert score("reward_plugins:has_digit") == [1.0, 1.0, 0.0]
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text("def exclaim(prompts, completions, **kw):\n    return [float(c.endswith('!')) for c in completions]\n")
    assert score(f"{plugin}:exclaim", ["a!", "b", "c!"]) == [1.0, 0.0, 1.0]
    (reward,) = resolve_rewards(['format(pattern="^\\\\d+$")@0.25'])
    assert reward.weight == 0.25 and reward.settings == {"pattern": "^\\d+$"}
    assert score("reward_plugins:scaled(factor=2.0)", ["ab"]) == [4.0]
    assert score("reward_plugins:needs_answer") == [1.0, 0.0, 0.0]  # dataset columns arrive as keyword arguments


def test_entry_point_registered_by_another_package(tmp_path, monkeypatch):
    dist = tmp_path / "align_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: align-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[align.rewards]\nshouty = align_test_plugin:shouty\n")
    (tmp_path / "align_test_plugin.py").write_text(
        "def shouty(prompts, completions, **kw):\n    return [float(c.isupper()) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert score("shouty@2", ["HI", "hi", "OK"]) == [1.0, 0.0, 1.0]
    with pytest.raises(AlignError, match="Available: accuracy, closeness, format, length, shouty"):
        resolve_rewards(["shoty"])


def test_async_and_not_applicable_and_weighted_total():
    assert score("reward_plugins:async_len", ["ab", "abc"]) == [2.0, 3.0]
    partial = score("reward_plugins:only_short", ["ab", "abcdef"])
    assert partial == [1.0, None]
    assert weighted_total([[1.0, None], [2.0, 2.0]], [0.5, 1.0]) == [2.5, 2.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("reward_plugins:breaks_on_boom", r"'reward_plugins:breaks_on_boom' raised ZeroDivisionError: .* on sample 2 \(prompt 'What is 3 \+ 3\?'\)"),
        ("reward_plugins:nan_on_third", r"'reward_plugins:nan_on_third' returned nan for sample 2"),
        ("reward_plugins:too_few", r"'reward_plugins:too_few' returned 1 values for 3 samples"),
        ("reward_plugins:text_score", r"'reward_plugins:text_score' returned 'high' for sample 0"),
    ],
)
def test_faults_name_the_function_and_sample(spec, message):
    with pytest.raises(RewardError, match=message):
        score(spec)


def test_timeout_and_skip_policy():
    with pytest.raises(RewardError, match="'reward_plugins:slow' timed out after 0.2s"):
        score("reward_plugins:slow", timeout=0.2)
    assert score("reward_plugins:breaks_on_boom", on_fault="skip") == [1.0, 1.0, None]
    assert score("reward_plugins:nan_on_third", on_fault="skip") == [0.0, 0.0, None]


def test_bad_specs_are_reported_together():
    with pytest.raises(AlignError) as e:
        resolve_rewards(["acuracy", "accuracy@heavy", "reward_plugins:nope", "nosuchmodule:fn", "length(max_length=2, cache=5)"])
    text = str(e.value)
    assert "Unknown reward 'acuracy'. Did you mean 'accuracy'?" in text
    assert "the weight after '@' must be a number, got 'heavy'" in text
    assert "module reward_plugins has no 'nope'" in text and "has_digit" in text
    assert "cannot import module 'nosuchmodule'" in text
    assert "bad settings for 'length'" in text


def test_reward_model_run_is_a_reward_source(cli, sft_run, tmp_path):
    code, _, err = cli("rm", "--from", sft_run, "--data", "arith-prefs", "--output", tmp_path / "rm", "--max-steps", "2",
                       "--no-tensorboard")
    assert code == 0, err
    (reward,) = resolve_rewards([f"{tmp_path / 'rm'}@0.5"])
    values = GuardedReward(reward)(PROMPTS, COMPLETIONS)
    assert reward.weight == 0.5 and len(values) == 3 and all(isinstance(v, float) for v in values)


def test_rewards_check_cli(cli, sft_run, data_dir):
    code, out, err = cli("rewards", "check", "accuracy", "reward_plugins:has_digit@0.5", "--data", data_dir / "security_qa.json")
    assert code == 2 and "needs a 'prompt'" in err
    code, out, err = cli("rewards", "check", "accuracy", "length(max_length=16, cache=8)", "--data", "arith-prompts",
                         "--from", sft_run, "--num-samples", "4")
    assert code == 0, err
    assert "accuracy | length(max_length=16, cache=8) | total" in out
    assert "ms per call" in out and "returns list[float | None]: ok" in out
    code, _, err = cli("rewards", "check", "reward_plugins:breaks_on_boom", "--data", "arith-prompts", "--from", sft_run,
                       "--num-samples", "2")
    assert code == 0  # generated completions are never "boom"

