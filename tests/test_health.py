"""Issue 19, degenerate training and defaults that fit the model: real runs whose weights blow up or turn NaN fail
(exit 2, run.json `failed` with its `health`); rewards that never apply are a warning in run.json and `align report`,
and a failure under --strict; a --max-length the user never set is lowered to the model's positions; a full disk is
exit 2 naming it; a run in progress (a torn last metrics line) can be reported."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

FAST = ["--max-steps", "2", "--batch-size", "2", "--logging-steps", "1", "--no-tensorboard"]
GRPO = ["--data", "arith-prompts", "--num-generations", "2", "--batch-size", "4", "--max-completion-length", "4",
        "--max-steps", "2", "--logging-steps", "1", "--backend", "hf", "--no-tensorboard"]


def _manifest(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


@pytest.mark.parametrize(("lr", "expected"), [("1e38", "trained weight tensors hold NaN/inf"),
                                              ("1e6", "the trained weights grew to max |w| =")])
def test_diverged_weights_fail_the_run(cli, tiny_model, tmp_path, lr, expected):
    """--lr 1e38: the second step turns every adapter weight NaN; --lr 1e6: finite weights of ~1e6 (the model emits
    a uniform distribution, grad norm 0). Either way the run fails, without --strict, and no adapter is written."""
    run = tmp_path / "run"
    code, _, err = cli("sft", "--model", tiny_model, "--data", "arith", "-o", run, "--lr", lr, *FAST)
    assert code == 2, err[-2000:]
    assert "Training diverged: " in err and expected in err and "Traceback" not in err
    manifest = _manifest(run)
    assert manifest["status"] == "failed" and "Training diverged" in manifest["error"]
    assert not (run / "adapter").exists()
    weights = manifest["health"]["weights"]
    assert weights["non_finite_tensors"] > 0 if lr == "1e38" else weights["max_abs_end"] > 1e4


def test_rewards_that_never_apply_warn_and_fail_under_strict(cli, sft_run, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    run = tmp_path / "grpo"
    code, out, err = cli("grpo", "--from", sft_run, "--reward", "reward_plugins:never_applies", "-o", run, *GRPO)
    assert code == 0, err[-2000:]
    health = _manifest(run)["health"]
    assert health["rewards"]["never_applies"] == {"steps": 2, "all_none_steps": 2, "min": None, "max": None}
    assert any("reward 'never_applies' was None (not applicable) for every sample" in w for w in health["warnings"])
    code, out, err = cli("report", run)
    assert code == 0 and "WARNING: reward 'never_applies' was None" in out
    assert "reward &#x27;never_applies&#x27; was None" in (run / "report" / "report.html").read_text()

    strict = tmp_path / "strict"
    code, _, err = cli("grpo", "--from", sft_run, "--reward", "reward_plugins:never_applies", "-o", strict, "--strict",
                       *GRPO)
    assert code == 2 and "--strict: the grpo run trained, but degenerately" in err and "never_applies" in err
    assert _manifest(strict)["status"] == "failed"


def test_pairs_with_chosen_equal_to_rejected_are_counted(cli, sft_run, tmp_path):
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"{i} + 1?", "chosen": str(i + 1), "rejected": str(i + 1 if i == 0 else i + 2)} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "dpo"
    code, _, err = cli("dpo", "--from", sft_run, "--data", data, "-o", run, "--max-steps", "1", "--batch-size", "4",
                       "--no-tensorboard")
    assert code == 0, err[-2000:]
    health = _manifest(run)["health"]
    assert health["identical_pairs"] == 0.25
    assert "1 of 4 training pairs have chosen == rejected: they teach nothing" in health["warnings"]


def test_assess_flags_flat_loss_constant_rewards_and_silent_groups():
    from align.health import assess

    records = [{"step": s, "loss": 0.5, "grad_norm": 0.0 if s > 1 else 0.3, "rewards/acc/mean": 0.0,
                "frac_reward_zero_std": 1.0} for s in (1, 2, 3)] + [{"step": 3, "train_runtime": 1.0}]
    health = assess(records, None, {"max_abs": 0.1}, {"max_abs": 0.2, "non_finite": []})
    text = " | ".join(health["warnings"])
    assert health["zero_grad_steps"] == 2 and "the gradient norm is 0 over the last 2 logged steps (from step 2" in text
    assert "reward 'acc' was 0 at every logged step" in text
    assert health["zero_std_groups"] == 1.0 and "every GRPO group got the same reward" in text
    healthy = [{"step": s, "loss": 1.0 / s, "grad_norm": 0.5, "rewards/acc/mean": s / 4} for s in (1, 2, 3)]
    assert assess(healthy, None, None, None)["warnings"] == []


def test_an_unset_max_length_fits_the_model(cli, tmp_path):
    """A model with 512 positions trains with the defaults (max_length 1024 lowered to 512, logged and recorded);
    the same 1024 given explicitly is refused, as a flag and through the Python API."""
    import align
    from align.errors import AlignError
    from align.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "m512", max_position_embeddings=512)
    run = tmp_path / "run"
    code, _, err = cli("sft", "--model", model, "--data", "arith", "-o", run, "--max-steps", "1", "--no-tensorboard")
    assert code == 0, err[-2000:]
    manifest = _manifest(run)
    assert manifest["config"]["max_length"] == 512 and manifest["fitted_defaults"] == {"max_length": [1024, 512]}
    code, _, err = cli("sft", "--model", model, "--data", "arith", "-o", tmp_path / "b", "--max-length", "1024")
    assert code == 2 and "--max-length 1024 exceeds the model's 512 positions" in err
    with pytest.raises(AlignError, match="--max-length 1024 exceeds the model's 512 positions"):
        align.sft(model=str(model), data="arith", output=str(tmp_path / "c"), max_length=1024)


def test_optional_numbers_take_none_and_negative_numbers_are_values():
    from align.cli import build
    from align.config import parse_args

    top, parsers = build()
    parser, cls = parsers["sft"]
    cfg = parse_args(cls, top, ["sft", "--save-total-limit", "none", "--lr", "-1e-3", "--warmup", "-.5"], sub=parser)
    assert cfg.save_total_limit is None and cfg.lr == -1e-3 and cfg.warmup == -0.5
    problems = cfg.problems().items
    assert "--lr must be positive, got -0.001." in problems and "--warmup must be >= 0, got -0.5." in problems


def test_a_run_in_progress_is_reported_despite_a_torn_last_line(cli, sft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 21, "loss": 0.')  # the writer is mid-line
    code, out, err = cli("report", run)
    assert code == 0, err
    assert (run / "report" / "report.html").is_file()


def test_a_full_disk_fails_the_run_and_names_the_disk(cli, tiny_model, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                                   capture_output=True).returncode:
        pytest.skip("no small file system can be mounted here (needs root)")
    try:
        run = disk / "run"
        code, _, err = cli("sft", "--model", tiny_model, "--data", "arith", "-o", run, "--max-steps", "1",
                           "--batch-size", "2", "--no-tensorboard")
        assert code == 2, err[-2000:]
        assert f"No space left on device writing {run}" in err and f"(file system {disk}:" in err
        assert "Traceback" not in err
        assert _manifest(run)["status"] == "failed"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_pipeline_stages_are_strict_by_default(tiny_model, tmp_path):
    from align.pipeline import resolve

    spec = {"model": tiny_model, "output": str(tmp_path / "o"), "stages": [
        {"name": "sft", "kind": "sft", "data": "arith"},
        {"name": "loose", "kind": "sft", "data": "arith", "strict": False, "from": "sft"}]}
    _, stages = resolve(spec, "p.yaml")
    assert [s.cfg.strict for s in stages] == [True, False]
