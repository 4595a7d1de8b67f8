"""Over-optimization in plain view (issue 18): gold metrics are logged beside the proxy and never reach the loss (ppo
and grpo train identically with and without a gold reward that contradicts the proxy); --keep-best picks the right
step (hand-made metric records) and keeps that step's weights; `align report` draws gold vs proxy over steps and
against the KL to the parent and names the gold peak; a pipeline hands the best step on and names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import max_adapter_difference

from align.errors import AlignError

FAST = ["--max-completion-length", "6", "--backend", "hf", "--no-tensorboard", "--seed", "0"]
ANTI_LENGTH = "reward_plugins:short_is_better"  # gold that punishes exactly what the proxy (text_len) rewards


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def eval_prompts(tmp_path_factory) -> Path:
    """Sixteen held-out prompts with answers (a slice of the bundled arith-prompts-eval)."""
    from align.data.samples import bundled_path

    path = tmp_path_factory.mktemp("overopt") / "eval.jsonl"
    path.write_text("".join(Path(bundled_path("arith-prompts-eval")).read_text().splitlines(True)[:16]))
    return path


# -- keep-best selection, from hand-made records ----------------------------------------------------------------
RECORDS = [
    {"step": 0, "eval/gold/accuracy/mean": 0.25, "eval/score": 0.1},
    {"step": 1, "objective/scores": 0.4},  # a training step: no held-out value
    {"step": 2, "eval/gold/accuracy/mean": 0.5, "eval/score": 0.3, "eval_loss": 2.0},
    {"step": 4, "eval/gold/accuracy/mean": 0.75, "eval/score": 0.9, "eval_loss": 1.5},
    {"step": 6, "eval/gold/accuracy/mean": 0.75, "eval/score": 1.4, "eval_loss": 1.7},  # a tie: the earlier stays
    {"step": 8, "eval/gold/accuracy/mean": 0.5, "eval/score": 2.1, "eval_loss": float("nan")},
]


def test_keep_best_picks_the_best_step_of_hand_made_records():
    from align.stages import best

    assert best.pick(RECORDS, "eval/gold/accuracy/mean") == (4, 0.75)  # gold peaked at 4 while the proxy kept rising
    assert best.pick(RECORDS, "eval/score") == (8, 2.1)
    assert best.pick(RECORDS, "eval_loss", "min") == (4, 1.5)  # NaN is never a best
    assert best.pick(RECORDS, "eval/gold/accuracy/mean", "min") == (0, 0.25)
    assert best.pick(RECORDS, "eval_gold/accuracy/mean") == (4, 0.75)  # TRL's spelling names the same metric
    assert best.pick(RECORDS, "eval/kl") is None
    assert best.parse("eval_loss:min") == ("eval_loss", "min")
    assert best.parse("eval/gold/accuracy/mean") == ("eval/gold/accuracy/mean", "max")


@pytest.mark.parametrize("spec", ["objective/scores", "eval_loss", ":min", "eval_"])
def test_keep_best_refuses_a_bad_metric(spec):
    from align.stages import best

    with pytest.raises(AlignError, match="--keep-best"):
        best.parse(spec)


def test_keeper_saves_each_new_best_and_says_when_the_metric_never_came(tmp_path):
    from align.runs import Run
    from align.stages.best import Keeper

    keeper = Keeper(Run(tmp_path), "eval/gold/accuracy/mean")
    saved = []

    def save(directory: Path) -> None:
        directory.mkdir()
        (directory / "weights").write_text(str(step))
        saved.append(step)

    for record in RECORDS:
        step = record["step"]
        keeper.offer(record, step, save)
    assert saved == [0, 2, 4] and keeper.finish() == {"metric": "eval/gold/accuracy/mean", "mode": "max", "step": 4,
                                                       "value": 0.75}
    assert (tmp_path / "best" / "adapter" / "weights").read_text() == "4"
    resumed = Keeper(Run(tmp_path), "eval/gold/accuracy/mean", resume_step=3)  # the best lies in the replayed steps
    assert resumed.step is None and not (tmp_path / "best").exists()
    never = Keeper(Run(tmp_path), "eval/kl")
    for record in RECORDS:
        never.offer(record, record["step"], save)
    with pytest.raises(AlignError, match="never logged eval/kl.*eval/gold/accuracy/mean"):
        never.finish()


def test_keep_best_and_gold_are_validated_with_every_problem(cli, sft_run, tmp_path):
    code, _, err = cli("ppo", "--from", sft_run, "--data", "arith-prompts", "--reward", "reward_plugins:text_len",
                       "--gold-reward", "acuracy", "--keep-best", "eval/gold/length/mean", "--output", tmp_path / "x")
    assert code == 2, err
    assert "--gold-reward" in err and "acuracy" in err
    assert "--keep-best eval/gold/length/mean" in err and "--eval-data" in err
    code, _, err = cli("ppo", "--from", sft_run, "--data", "arith-prompts", "--reward", "reward_plugins:text_len",
                       "--gold-reward", "accuracy", "--keep-best", "eval/gold/closeness/mean", "--eval-split", "0.1",
                       "--output", tmp_path / "y")
    assert code == 2 and "logs no eval/gold/closeness/mean. It logs eval/gold/accuracy/mean" in err, err


# -- gold is logged, and never trained on ------------------------------------------------------------------------
STAGE_ARGS = {
    "ppo": ["--batch-size", "8", "--ppo-epochs", "1", "--lr", "1e-3", "--kl-coef", "0.01"],
    "grpo": ["--batch-size", "4", "--num-generations", "2", "--lr", "1e-3", "--logging-steps", "1"],
}


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_gold_is_logged_beside_the_proxy_and_never_reaches_the_loss(cli, sft_run, eval_prompts, tmp_path, stage):
    few = tmp_path / "eval4.jsonl"
    few.write_text("".join(eval_prompts.read_text().splitlines(True)[:4]))
    runs = {}
    for name, gold in (("plain", []), ("gold", ["--gold-reward", ANTI_LENGTH, "accuracy"])):
        runs[name] = tmp_path / name
        code, _, err = cli(stage, "--from", sft_run, "--data", "arith-prompts", "--reward", "reward_plugins:text_len",
                           *gold, "--eval-data", few, "--eval-steps", "1", "--max-steps", "2",
                           "--output", runs[name], *STAGE_ARGS[stage], *FAST)
        assert code == 0, err
    assert max_adapter_difference(runs["plain"], runs["gold"]) < 1e-6  # the gold would pull the other way
    plain, gold = _metrics(runs["plain"]), _metrics(runs["gold"])
    proxy = "objective/scores" if stage == "ppo" else "reward"
    held_out = "eval/" if stage == "ppo" else "eval_"
    trained = [m for m in gold if proxy in m]
    assert len(trained) == 2
    for m, p in zip(trained, [m for m in plain if proxy in m], strict=True):
        assert m[proxy] == pytest.approx(p[proxy], abs=1e-6)  # the same rollouts, scored the same by the proxy
        assert m["gold/short_is_better/mean"] == pytest.approx(-m["rewards/text_len/mean"], abs=1e-4)  # side by side
        assert 0.0 <= m["gold/accuracy/mean"] <= 1.0
        assert not any(k.startswith("gold/") for k in p)
    evals = [m for m in gold if f"{held_out}gold/accuracy/mean" in m]
    assert len(evals) >= 2 and all(f"{held_out}gold/short_is_better/mean" in m for m in evals)


# -- keep-best and the report on a real sft -> rm -> ppo run ---------------------------------------------------
@pytest.fixture(scope="module")
def rm_run(sft_run, tmp_path_factory) -> Path:
    import align

    return align.rm(from_run=str(sft_run), data="arith-prefs", output=str(tmp_path_factory.mktemp("rm") / "rm"),
                    max_steps=20, batch_size=16, lr=1e-3, logging_steps=10, tensorboard=False)


KEPT = "eval/gold/closeness/mean"


@pytest.fixture(scope="module")
def rlhf_run(sft_run, rm_run, eval_prompts, tmp_path_factory) -> Path:
    """ppo on the reward model alone; gold = the accuracy verifier and closeness to the answer (graded: the tiny
    parent is rarely exactly right); the best held-out closeness step kept; every checkpoint kept so the test can
    compare weights."""
    import align

    return align.ppo(from_run=str(sft_run), data="arith-prompts", reward_model=str(rm_run),
                     gold_reward=["accuracy", "closeness(scale=50)"], keep_best=KEPT, eval_data=str(eval_prompts),
                     eval_steps=1, max_steps=6, save_steps=1, save_total_limit=0,
                     output=str(tmp_path_factory.mktemp("rlhf") / "ppo"), batch_size=8, ppo_epochs=2, lr=3e-3,
                     kl_coef=0.01, max_completion_length=6, backend="hf", tensorboard=False, seed=0)


def test_keep_best_keeps_the_best_held_out_step(rlhf_run):
    from safetensors.torch import load_file

    from align.stages import best

    records = _metrics(rlhf_run)
    step, value = best.pick(records, KEPT)
    manifest = json.loads((rlhf_run / "run.json").read_text())
    assert manifest["best"] == {"metric": KEPT, "mode": "max", "step": step, "value": value}
    assert not (rlhf_run / "best").exists()  # installed as adapter/, then removed
    kept = load_file(str(rlhf_run / "adapter" / "adapter_model.safetensors"))
    if step == 0:  # the starting policy: the fresh adapter on the merged parent is zero
        assert all(v.abs().max() == 0 for k, v in kept.items() if "lora_B" in k)
    else:
        chosen = load_file(str(rlhf_run / "checkpoints" / f"checkpoint-{step}" / "actor.safetensors"))
        assert kept.keys() == chosen.keys()
        assert max((kept[k] - chosen[k]).abs().max().item() for k in kept) == 0.0
    proxy = [m for m in records if "rewards/reward_model:rm/mean" in m]
    assert proxy and all("gold/accuracy/mean" in m and "gold/closeness/mean" in m for m in proxy)
    assert all("eval/kl" in m and "eval/score" in m for m in records if KEPT in m)


def test_report_draws_gold_against_proxy_and_kl_and_names_the_peak(cli, rlhf_run):
    from align.stages import best

    code, out, err = cli("report", rlhf_run)
    assert code == 0, err
    report = rlhf_run / "report"
    md = (report / "report.md").read_text()
    assert "## Over-optimization" in md
    for gold in ("accuracy", "closeness"):
        for name in (f"overoptimization_{gold}_steps.png", f"overoptimization_{gold}_kl.png"):
            assert (report / name).stat().st_size > 10_000, name
            assert name in md
        step, value = best.pick(_metrics(rlhf_run), f"eval/gold/{gold}/mean")
        assert f"- held-out gold {gold} peaked at step {step} ({value:.4g})" in md, md
    assert f"Kept (--keep-best {KEPT}:max): the policy of step" in md


# -- a pipeline hands the best step on ---------------------------------------------------------------------------
def test_pipeline_hands_the_best_step_on_and_names_it(cli, sft_run, rm_run, eval_prompts, tmp_path):
    from align.pipeline import run_pipeline

    result = run_pipeline({
        "output": str(tmp_path / "pipe"), "seed": 0,
        "eval": {"data": str(eval_prompts), "max_new_tokens": 6, "reward": ["closeness(scale=50)"]},
        "stages": [
            {"name": "ppo", "kind": "ppo", "from": str(sft_run), "data": "arith-prompts", "reward_model": str(rm_run),
             "eval_data": str(eval_prompts), "eval_steps": 1, "max_steps": 2, "keep_best": "eval/gold/accuracy/mean",
             "batch_size": 8, "ppo_epochs": 1, "max_completion_length": 6, "backend": "hf", "tensorboard": False},
            {"name": "sft2", "kind": "sft", "data": "arith", "max_steps": 1, "batch_size": 4, "packing": False,
             "tensorboard": False},
        ]})
    ppo, sft2 = result["stages"]
    manifest = json.loads((tmp_path / "pipe" / "ppo" / "run.json").read_text())
    assert manifest["config"]["gold_reward"] == ["closeness(scale=50)", "accuracy"]  # the eval block's, by default
    assert ppo["best"] == manifest["best"] and ppo["best"]["metric"] == "eval/gold/accuracy/mean"
    assert ppo["best"]["step"] in (0, 1, 2)
    child = json.loads((tmp_path / "pipe" / "sft2" / "run.json").read_text())
    assert Path(child["parent"]).name == "ppo" and sft2["from"] == "ppo"
    code, _, err = cli("report", tmp_path / "pipe")
    assert code == 0, err
    page = (tmp_path / "pipe" / "report" / "report.md").read_text()
    assert f"| ppo | ppo | base | completed | step {ppo['best']['step']} (eval/gold/accuracy/mean = " in page, page


def test_keep_best_in_a_trl_stage_keeps_that_steps_adapter(tiny_model, tmp_path):
    """The TRL stages (sft here; dpo, grpo and rm alike) feed their logged records to the same keeper."""
    from safetensors.torch import load_file

    import align
    from align.stages import best

    out = align.sft(model=tiny_model, data="arith", eval_data="arith-eval", output=str(tmp_path / "sft"), max_steps=4,
                    lr=3e-2, batch_size=8, eval_batch_size=64, packing=False, logging_steps=1, eval_steps=1,
                    save_steps=1, save_total_limit=0, keep_best="eval_mean_token_accuracy", tensorboard=False)
    step, value = best.pick(_metrics(out), "eval_mean_token_accuracy")
    assert json.loads((out / "run.json").read_text())["best"] == {"metric": "eval_mean_token_accuracy", "mode": "max",
                                                                  "step": step, "value": value}
    kept = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    if step == 0:
        assert all(v.abs().max() == 0 for k, v in kept.items() if "lora_B" in k)
    else:
        chosen = load_file(str(out / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors"))
        assert max((kept[k] - chosen[k]).abs().max().item() for k in kept) == 0.0
