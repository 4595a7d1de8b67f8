"""`align ppo`: KL to the parent is 0 at the first step (LoRA and QLoRA parents, both hand-off ways); a critic
initialised from the reward model reproduces the reward model's score; sft → rm → ppo raises the reward-model
score of held-out completions while the value loss falls (and a rule reward rises); a killed run resumes exactly
where it stopped, after kill -9 or SIGTERM; bad configs are refused at once."""

from __future__ import annotations

import json
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import kill_at_checkpoint, max_adapter_difference, signal_after_step

PPO_ARGS = ["--data", "arith-prompts", "--batch-size", "16", "--max-completion-length", "8", "--backend", "hf",
            "--no-tensorboard"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ppo")


@pytest.fixture(scope="module")
def rm_run(sft_run, runs) -> Path:
    import align

    return align.rm(from_run=str(sft_run), data="arith-prefs", eval_data="arith-prefs-eval", output=str(runs / "rm"),
                    max_steps=40, batch_size=16, lr=1e-3, logging_steps=20, tensorboard=False)


@pytest.fixture(scope="module")
def qlora_parent(tiny_model, runs) -> Path:
    import align

    return align.sft(model=tiny_model, data="arith", output=str(runs / "sft-qlora"), adapter="qlora", max_steps=10,
                     lr=3e-3, batch_size=16, packing=False, logging_steps=10, tensorboard=False)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ppo(cli, *args) -> None:
    code, _, err = cli("ppo", *args)
    assert code == 0, err


@pytest.mark.parametrize("parent", ["lora", "qlora"])
@pytest.mark.parametrize("handoff", ["merge", "continue"])
def test_kl_to_the_parent_is_zero_at_the_first_step(cli, sft_run, qlora_parent, rm_run, tmp_path, parent, handoff):
    source = sft_run if parent == "lora" else qlora_parent
    out = tmp_path / "ppo"
    _ppo(cli, "--from", source, "--handoff", handoff, "--reward-model", rm_run, "--output", out, "--max-steps", "2",
         "--kl-coef", "0.2", *PPO_ARGS)
    first, second = _metrics(out)
    assert first["step"] == 1 and first["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["objective/non_score_reward"] == pytest.approx(0.0, abs=1e-6)
    assert second["objective/kl"] != 0.0  # the actor moved after one step, the reference did not
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stage"] == "ppo" and manifest["handoff"] == handoff and manifest["status"] == "completed"
    assert manifest["quantized_4bit"] == (parent == "qlora")
    shared = parent == "lora" and handoff == "merge"  # the rm was trained on the merged lora parent
    assert manifest["critic"]["placement"] == ("shared" if shared else "separate"), manifest["critic"]
    assert manifest["critic"]["init"] == "reward_model"
    assert (out / "critic" / "critic.safetensors").is_file()
    from align.handoff import load_run_policy

    load_run_policy(out)  # the actor is a policy run the next stage can start from


@pytest.mark.parametrize("adapter", ["dora", "rslora", "loha", "lokr", "vera", "ia3"])
def test_every_supported_adapter_kind_trains_from_a_base(cli, tiny_model, tmp_path, adapter):
    out = tmp_path / adapter
    _ppo(cli, "--model", tiny_model, "--adapter", adapter, "--reward", "reward_plugins:text_len", "--output", out,
         "--max-steps", "2",
         "--kl-coef", "0.2", "--lr", "1e-2", *PPO_ARGS)
    first, second = _metrics(out)
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6) and second["objective/kl"] != 0.0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["adapter"] == adapter and manifest["critic"] == {"init": "policy", "placement": "shared"}
    from align.handoff import load_run_policy

    load_run_policy(out)


@pytest.mark.parametrize("adapter", ["lora", "loha", "lokr", "ia3"])
def test_the_optimizer_holds_every_actor_and_critic_weight(tiny_model, tmp_path, adapter):
    from align.stages.common import start_stage
    from align.stages.online import load_prompt_data
    from align.stages.ppo import PPO, PPOConfig

    cfg = PPOConfig.from_kwargs(model=tiny_model, adapter=adapter, reward=["closeness"], data="arith-prompts",
                                output=str(tmp_path / "ppo"), backend="hf", tensorboard=False)
    ppo = PPO(cfg, start_stage(cfg, "ppo", load_prompt_data))
    optimised = {id(p) for group in ppo.optimizer.param_groups for p in group["params"]}
    names = {n for n, p in ppo.model.named_parameters() if id(p) in optimised}
    for adapter_name in ("default", "critic"):
        weights = {n for n, _ in ppo.model.named_parameters() if n.endswith(f".{adapter_name}") or f".{adapter_name}." in n}
        assert weights and weights <= names, (adapter_name, sorted(weights - names)[:3])
    assert all(id(p) in optimised for p in ppo.critic.head.parameters())
    assert not any(".ref" in n for n in names)
    ppo.engine.close()


@pytest.mark.parametrize("placement", ["shared", "separate"])
def test_critic_from_the_reward_model_reproduces_its_score(sft_run, rm_run, tmp_path, placement):
    import torch

    from align.models import activate, backbone
    from align.rewards.reward_model import RewardModelScorer
    from align.stages.common import start_stage
    from align.stages.online import load_prompt_data
    from align.stages.ppo import PPO, PPOConfig

    cfg = PPOConfig.from_kwargs(from_run=str(sft_run), reward_model=str(rm_run), data="arith-prompts",
                                output=str(tmp_path / "ppo"), critic_placement=placement, backend="hf",
                                tensorboard=False)
    ppo = PPO(cfg, start_stage(cfg, "ppo", load_prompt_data))
    critic = ppo.critic
    assert critic.placement == placement and critic.init == "reward_model"
    prompts = ["What is 3 + 5?", "What is 12 - 7?", "What is 40 + 2?"]
    answers = ["8", "It could be -5.", "42"]
    expected = RewardModelScorer(rm_run).score(prompts, answers)
    tokenizer = ppo.tokenizer
    got = []
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers, strict=True):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": answer}], tokenize=False)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            if placement == "shared":
                activate(critic.model, critic.adapter)
            hidden = backbone(critic.model)(input_ids=ids).last_hidden_state
            got.append(critic.head(hidden[:, -1]).item())
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(round(x, 3) for x in expected)) == 3  # the scores differ, so the match is not trivial
    # the reward model itself runs as a frozen adapter on the actor's base (no copy of its own), same scores
    scorer = ppo.rewards[0].reward.fn
    assert ppo.reward_models == {str(rm_run): "shared"} and scorer._model is None
    assert scorer.score(prompts * 2, answers + ["7", "5", "It might be 40."]) == pytest.approx(
        expected + RewardModelScorer(rm_run).score(prompts, ["7", "5", "It might be 40."]), abs=1e-4)
    ppo.engine.close()


def test_sft_rm_ppo_raises_the_reward_model_score(cli, sft_run, rm_run, runs):
    out = runs / "ppo-learn"
    _ppo(cli, "--from", sft_run, "--reward-model", rm_run, "--eval-data", "arith-prompts-eval", "--output", out,
         "--max-steps", "30", "--lr", "3e-4", "--eval-steps", "10", "--seed", "0", *PPO_ARGS)
    metrics = _metrics(out)
    evals = [m["eval/score"] for m in metrics if "eval/score" in m]
    assert len(evals) == 4 and evals[-1] > evals[0] + 1.0, evals
    value_losses = [m["loss/value_avg"] for m in metrics if "loss/value_avg" in m]
    assert statistics.fmean(value_losses[-10:]) < 0.75 * statistics.fmean(value_losses[:5]), value_losses
    for key in ("objective/kl", "policy/clipfrac_avg", "policy/approxkl_avg", "val/explained_variance",
                "policy/entropy_avg", "completions/mean_length", "objective/non_score_reward", "timing/rollout_s"):
        assert key in metrics[-1]
    assert f"rewards/reward_model:{rm_run.name}/mean" in metrics[-1]
    assert (out / "critic" / "critic.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()


def test_ppo_with_a_rule_reward_raises_it(cli, sft_run, runs):
    out = runs / "ppo-rule"
    _ppo(cli, "--from", sft_run, "--reward", "closeness(scale=50)", "--output", out, "--max-steps", "45",
         "--lr", "3e-4", "--seed", "0", *PPO_ARGS)
    scores = [m["objective/scores"] for m in _metrics(out)]
    assert statistics.fmean(scores[-5:]) > statistics.fmean(scores[:5]) + 0.1, scores
    assert json.loads((out / "run.json").read_text())["critic"] == {"init": "policy", "placement": "shared"}


@pytest.fixture(scope="module")
def resume_args(sft_run, rm_run) -> list[str]:
    # every run in its own process, so all see the same environment (imports in the test process, e.g. vLLM, can
    # change torch's numerics slightly and with them the sampled tokens)
    return [sys.executable, "-m", "align", "ppo", "--from", str(sft_run), "--reward-model", str(rm_run),
            "--max-steps", "6", "--save-steps", "2", "--batch-size", "8", "--ppo-epochs", "2", "--num-minibatches", "2",
            "--grad-accum", "2", "--data", "arith-prompts", "--max-completion-length", "8", "--backend", "hf",
            "--no-tensorboard"]


@pytest.fixture(scope="module")
def straight_ppo(resume_args, runs) -> Path:
    subprocess.run([*resume_args, "--output", str(runs / "straight")], check=True, capture_output=True)
    return runs / "straight"


def _resume_and_compare(args: list[str], run: Path, straight: Path) -> None:
    resumed = subprocess.run([*args, "--output", str(run), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["resumed_at"]) == 1
    got, expected = _metrics(run), _metrics(straight)
    assert [m["step"] for m in got] == list(range(1, 7))
    for a, b in zip(got, expected, strict=True):
        for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "learning_rate", "kl_coef"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert max_adapter_difference(run, straight) <= 1e-5


def test_killed_run_resumes_exactly_where_it_stopped(resume_args, straight_ppo, tmp_path):
    import torch

    run = tmp_path / "killed"
    kill_at_checkpoint([*resume_args, "--output", str(run)], run, 2)
    for saved in (p for p in (run / "checkpoints" / "checkpoint-2").rglob("*") if p.is_file()):  # no pickled weights
        assert saved.suffix in (".safetensors", ".json", ".pt"), saved
        if saved.suffix == ".pt":
            assert torch.load(saved, weights_only=True)["rng"]
    _resume_and_compare(resume_args, run, straight_ppo)


@pytest.mark.slow  # the signal path of every stage is test_resume.py's; ppo's kill -9 resume stays quick
def test_sigterm_saves_the_current_step_and_resume_loses_nothing(resume_args, straight_ppo, tmp_path):
    run = tmp_path / "stopped"
    code, err = signal_after_step([*resume_args, "--output", str(run)], run, 1, signal.SIGTERM)
    assert code == 143 and "Traceback" not in err, err[-3000:]
    found = re.search(r"align ppo: interrupted \(SIGTERM\) at step (\d+); checkpoint saved to (\S+); continue with "
                      r"--resume", err)
    assert found, err[-3000:]
    step = int(found.group(1))
    assert 1 < step < 6 and found.group(2) == str(run / "checkpoints" / f"checkpoint-{step}")
    assert json.loads((run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())[
        "global_step"] == step
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    _resume_and_compare(resume_args, run, straight_ppo)


def test_bad_ppo_config_is_refused_with_every_problem(cli, sft_run, tmp_path):
    out = tmp_path / "x"
    code, _, err = cli("ppo", "--from", sft_run, "--data", "arith-prompts", "--output", out, "--reward", "closeness",
                       "--adapter", "prefix", "--critic-init", "reward_model", "--batch-size", "6",
                       "--num-minibatches", "4", "--gamma", "1.5")
    assert code == 2
    assert "--adapter prefix: ppo keeps actor, frozen reference and critic as adapters of one PEFT model" in err
    assert "--critic-init reward_model needs --reward-model RM_RUN" in err
    assert "--batch-size 6 must split into --num-minibatches 4" in err
    assert "--gamma must be in [0, 1], got 1.5" in err
    code, _, err = cli("ppo", "--from", sft_run, "--data", "arith-prompts", "--output", out, "--reward", "closeness",
                       "--vllm-server", "http://127.0.0.1:9")
    assert code == 2 and "add --handoff continue" in err
    assert "Traceback" not in err and not out.exists()
    code, _, err = cli("ppo", "--from", sft_run, "--data", "arith-prompts", "--output", out)
    assert code == 2 and "Give at least one reward" in err


def test_ppo_from_a_reward_model_run_is_refused(cli, rm_run, tmp_path):
    code, _, err = cli("ppo", "--from", rm_run, "--reward-model", rm_run, "--data", "arith-prompts",
                       "--output", tmp_path / "x")
    assert code == 2 and "cannot be the policy parent of ppo" in err and "--reward-model" in err


def test_generate_on_a_reward_model_run_is_refused(cli, rm_run):
    code, _, err = cli("generate", rm_run, "--prompt", "What is 1 + 1?")
    assert code == 2 and "is a reward model" in err and "align rm score" in err and "Traceback" not in err
