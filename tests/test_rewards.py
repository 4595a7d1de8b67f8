"""Reward specs of every kind, settings and weights, async rewards, and faults that name the function and
the sample; `align rewards check`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import HANG_S

from align.errors import AlignError
from align.rewards import GuardedReward, RewardError, resolve_rewards, weighted_total
from align.rewards.builtin import accuracy, closeness, format, length, positive

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


def test_positive_judges_reviews_on_topic_and_by_the_lexicon():
    """The reviews task's gold verifier on hand-written reviews of a kettle."""
    reviews = [
        "The kettle is solid and reliable.",  # positive, on topic
        "The kettle is bad and noisy.",  # negative
        "The KETTLE is good, but awful and useless.",  # more negative words than positive (case ignored)
        "The toaster is solid and reliable.",  # positive, off topic
        "The kettlebell is solid and reliable.",  # "kettle" only inside another word: off topic
        "The kettle is solid and bad.",  # a tie: not positive
        "",  # empty
        "Kettle: pleasant!",  # positive words need no template
    ]
    assert positive()(["Review the kettle."] * len(reviews), reviews, product=["kettle"] * len(reviews)) == \
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert positive()(["q"], ["The kettle is good."], product=[None]) == [None]  # no product: not applicable
    assert positive(column="item")(["q"], ["The mug is solid."], item=["mug"]) == [1.0]
    with pytest.raises(KeyError, match="positive needs a 'product' column"):
        positive()(["q"], ["The mug is solid."], answer=["mug"])


def test_accuracy_reads_numbers_as_people_write_them():
    acc = accuracy()
    got = acc(["q"] * 6, ["1234", "It costs $1,234.50.", "12%", "-3", "1,2,3", "about 1 234"],
              answer=["#### 1,234", "1234.5", "12", "-3", "3", "1234"])
    assert got == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # "1,2,3" is a list ending in 3; "1 234" is two numbers
    assert accuracy()(["q"], ["1,234"], answer=["1234"]) == [1.0]
    assert accuracy()(["q", "q"], ["\u22123", "-$5"], answer=["-3", "-5"]) == [1.0, 1.0]  # typographic minus, sign before $
    assert closeness(scale=10)(["q"], ["$1,230"], answer=["1,234"]) == [pytest.approx(0.6)]


def test_accuracy_math_mode_uses_math_verify():
    acc = accuracy(mode="math")
    completions = ["So the answer is $\\boxed{\\frac{3}{4}}$.", "It is 0.75", "$\\boxed{\\frac{2}{3}}$", "19", "x"]
    assert acc(["p"] * 5, completions, answer=["0.75", "\\frac{3}{4}", "3/4", "19", None]) == [1.0, 1.0, 0.0, 1.0, None]
    messages = [[{"role": "assistant", "content": "The final answer is $\\boxed{12}$"}]]
    assert acc(["p"], messages, answer=["12"]) == [1.0]
    # through the guard (a worker thread, where math-verify's signal-based timeouts would fail)
    assert score("accuracy(mode='math')", ["$2$", "\\boxed{4}", "6.0"]) == [1.0, 1.0, 1.0]
    with pytest.raises(AlignError, match="mode must be 'numeric', 'exact' or 'math'"):
        resolve_rewards(["accuracy(mode='latex')"])


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
    with pytest.raises(AlignError, match="Available: accuracy, closeness, format, length, positive, shouty"):
        resolve_rewards(["shoty"])


def test_async_and_not_applicable_and_weighted_total():
    assert score("reward_plugins:async_len", ["ab", "abc"]) == [2.0, 3.0]
    partial = score("reward_plugins:only_short", ["ab", "abcdef"])
    assert partial == [1.0, None]
    assert weighted_total([[1.0, None], [2.0, 2.0]], [0.5, 1.0]) == [2.5, 2.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("reward_plugins:breaks_on_boom", r"'breaks_on_boom' raised ZeroDivisionError: .* on sample 2 \(prompt 'What is 3 \+ 3\?'\)"),
        ("reward_plugins:nan_on_third", r"'nan_on_third' returned nan for sample 2"),
        ("reward_plugins:too_few", r"'too_few' returned 1 values for 3 samples"),
        ("reward_plugins:text_score", r"'text_score' returned 'high' for sample 0"),
    ],
)
def test_faults_name_the_function_and_sample(spec, message):
    with pytest.raises(RewardError, match=message):
        score(spec)


def test_timeout_and_skip_policy():
    with pytest.raises(RewardError, match="'slow' timed out after 0.2s"):
        score("reward_plugins:slow", timeout=0.2)
    assert score("reward_plugins:breaks_on_boom", on_fault="skip") == [1.0, 1.0, None]
    assert score("reward_plugins:nan_on_third", on_fault="skip") == [0.0, 0.0, None]


def test_a_hung_reward_does_not_hang_the_process():
    """The timeout fault ends the command at once: the hung call's thread does not keep the process alive."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "align", "rewards", "check", "reward_plugins:hangs", "--data", "arith",
                           "--timeout", "1"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 2 and "'hangs' timed out after 1.0s" in done.stdout + done.stderr
    assert time.monotonic() - start < 120, "the process waited for the hung reward (it sleeps 600 s)"


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
    assert code == 2 and "has prompts but no completions: pass --from RUN" in err
    code, out, err = cli("rewards", "check", "accuracy", "length(max_length=16, cache=8)", "--data", "arith-prompts",
                         "--from", sft_run, "--num-samples", "4")
    assert code == 0, err
    assert "accuracy | length | total" in out  # metric names are the functions' names; the spec is shown beside
    assert "length (length(max_length=16, cache=8)), weight 1:" in out
    assert "latency p50" in out and "returns list[float | None]: ok" in out
    code, _, err = cli("rewards", "check", "reward_plugins:breaks_on_boom", "--data", "arith-prompts", "--from", sft_run,
                       "--num-samples", "2")
    assert code == 0  # generated completions are never "boom"


def test_rewards_check_preflight_reports_group_spread_and_a_verdict(cli, sft_run):
    code, out, err = cli("rewards", "check", "accuracy", "closeness(scale=50)", "--data", "arith-prompts", "--from",
                         sft_run, "--num-samples", "3", "--num-generations", "4", "--max-new-tokens", "6")
    assert code == 0, err
    assert out.startswith("3 prompts × 4 completions; completions sampled from")
    assert "histogram:" in out and "of groups all equal" in out and "mean within-group std" in out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith(("OK:", "WARNING:"))
    # a reward that gives every completion the same score: GRPO would learn nothing
    code, out, err = cli("rewards", "check", "format", "--data", "arith-prompts", "--from", sft_run, "--num-samples", "3",
                         "--num-generations", "4", "--max-new-tokens", "6")
    assert code == 0, err
    assert "WARNING: 100% of groups have identical rewards (GRPO learns nothing from them): raise the temperature" in out
    # a faulty function: the report is printed with the fault, and the command fails
    code, out, err = cli("rewards", "check", "reward_plugins:too_few", "--data", "arith-prompts", "--from", sft_run,
                         "--num-samples", "2", "--max-new-tokens", "4")
    assert code == 2 and "fault: Reward function 'too_few' returned 1 values for 2 samples" in err
    assert "FAIL: 'too_few' faulted" in err
    code, _, err = cli("rewards", "check", "accuracy", "--data", "arith-prompts", "--num-generations", "4")
    assert code == 2 and "--num-generations needs --from RUN" in err


def test_factory_specs_names_and_the_pre_flight_signature_check():
    from align.rewards.registry import resolve_rewards

    rewards = resolve_rewards(["trl.rewards:get_soft_overlong_punishment(max_completion_len=12, soft_punish_cache=4)",
                               "reward_plugins:make_constant()", "accuracy", "accuracy(mode='exact')@0.5"])
    assert [r.name for r in rewards] == ["get_soft_overlong_punishment", "make_constant", "accuracy", "accuracy_2"]
    assert rewards[1].fn(prompts=["p"], completions=["c"]) == [0.5]  # `factory()` is called with no settings
    assert rewards[3].describe() == {"name": "accuracy_2", "spec": "accuracy(mode='exact')@0.5", "weight": 0.5}
    with pytest.raises(AlignError, match=r"does not take the reward call .* call it: 'reward_plugins:make_constant\(\)'"):
        resolve_rewards(["reward_plugins:make_constant"])


def test_one_reward_call_in_grpo_ppo_eval_and_rewards_check(cli, sft_run, tmp_path, monkeypatch):
    """The same recording reward through all four paths receives the same arguments: conversational prompts,
    assistant-message completions, completion_ids (token ids), the data's columns, trainer_state and TRL's hooks."""
    import json

    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("ALIGN_RECORD_REWARD_CALL", str(record))
    common = ["--max-completion-length", "4", "--no-tensorboard", "--max-steps", "1", "--batch-size", "4",
              "--num-generations", "2", "--reward", "reward_plugins:record"]
    seen = {}
    for path, args in {
        "grpo": ["grpo", "--from", sft_run, "--data", "arith-prompts", "--output", tmp_path / "grpo", *common],
        "ppo": ["ppo", "--from", sft_run, "--data", "arith-prompts", "--output", tmp_path / "ppo", *common],
        "eval": ["eval", sft_run, "--data", "arith-prompts", "--max-samples", "2", "--reward", "reward_plugins:record",
                 "--max-new-tokens", "4", "--reference", "none"],
        "rewards check": ["rewards", "check", "reward_plugins:record", "--data", "arith-prompts", "--from", sft_run,
                          "--num-samples", "2", "--num-generations", "2", "--max-new-tokens", "4"],
    }.items():
        record.unlink(missing_ok=True)
        code, _, err = cli(*map(str, args))
        assert code == 0, f"{path}: {err}"
        seen[path] = json.loads(record.read_text().splitlines()[0])
    message = {"content": "str", "role": "str"}
    for path, call in seen.items():
        assert call["prompts"] == ["list", ["list", message]], path
        assert call["completions"] == ["list", ["list", message]], path
        assert call["completion_ids_match"] and len(call["sizes"]) == 1, path
    state = {path: call["kwargs"].pop("trainer_state") for path, call in seen.items()}
    assert state == {"grpo": "TrainerState", "ppo": "TrainerState", "eval": "NoneType", "rewards check": "NoneType"}
    kwargs = [call["kwargs"] for call in seen.values()]
    assert all(k == kwargs[0] for k in kwargs), seen
    assert kwargs[0]["completion_ids"] == ["list", ["list", "int"]] and kwargs[0]["answer"] == ["list", "str"]
    assert kwargs[0]["log_metric"] == kwargs[0]["log_extra"] == "callable"
    manifest = json.loads((tmp_path / "ppo" / "run.json").read_text())
    assert manifest["rewards"] == [{"name": "record", "spec": "reward_plugins:record", "weight": 1.0}]
    metrics = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/record/mean" in metrics[0]
