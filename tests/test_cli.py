"""The command line: --help everywhere, YAML + flag precedence, and user errors (exit 2, one message, no
traceback, every problem at once, nothing written)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

from align.cli import COMMANDS, _load


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_documents_every_option(cli, command):
    code, out, _ = cli(*command.split(), "--help")
    assert code == 0
    cls = _load(COMMANDS[command][1])
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        assert flag in out, f"{flag} missing from `align {command} --help`"
        assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help text"


def test_top_level_help_lists_commands(cli):
    code, out, _ = cli("--help")
    assert code == 0 and all(name.split()[0] in out for name in COMMANDS)


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "align", "sft", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--max-steps" in proc.stdout


def test_all_problems_reported_at_once_before_loading(cli, tmp_path, data_dir):
    code, _, err = cli("sft", "--model", tmp_path / "nope", "--data", data_dir / "nonstring.jsonl",
                       "--output", tmp_path / "run", "--adapter", "lroa", "--lr", "-1")
    assert code == 2
    assert "Traceback" not in err
    assert "--model" in err and "no such directory" in err
    assert "Unknown adapter kind 'lroa'. Did you mean 'lora'? Available:" in err
    assert "--lr must be positive" in err
    assert "nonstring.jsonl:2: field 'messages[1].content' must be a string" in err
    assert not (tmp_path / "run").exists(), "nothing may be written for a refused run"


@pytest.mark.parametrize(
    "name, message",
    [
        ("malformed.jsonl", "malformed.jsonl:3: malformed JSON"),
        ("unknown_format.jsonl", "Columns found: foo, bar"),
        ("empty.jsonl", "the dataset is empty"),
        ("missing.jsonl", "Dataset not found"),
    ],
)
def test_data_errors_exit_2(cli, tiny_model, tmp_path, data_dir, name, message):
    code, _, err = cli("sft", "--model", tiny_model, "--data", data_dir / name, "--output", tmp_path / "run")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_yaml_config_and_flags_override(cli, tmp_path, tiny_model):
    from align.config import build_parser, parse_args
    from align.stages.sft import SFTConfig

    cfg_file = tmp_path / "sft.yaml"
    cfg_file.write_text(f"model: {tiny_model}\ndata: arith\nlr: 1e-4\nmax-steps: 7\ncolumns: {{prompt: q}}\n")
    cfg = parse_args(SFTConfig, build_parser(SFTConfig), ["--config", str(cfg_file), "--max-steps", "3", "-o", "x"])
    assert (cfg.model, cfg.data, cfg.lr, cfg.max_steps, cfg.output) == (tiny_model, "arith", 1e-4, 3, "x")
    assert cfg.columns == ["prompt=q"]


def test_yaml_errors_name_file_line_and_key(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nmax_stpes: 3\nbatch_size: many\n")
    code, _, err = cli("sft", "--config", bad)
    assert code == 2
    assert "unknown option 'max_stpes'. Did you mean 'max_steps'?" in err
    assert "option 'batch_size' must be an integer, got 'many'" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: 0.1\nmodel: [unclosed\n")
    code, _, err = cli("sft", "--config", broken)
    assert code == 2 and "broken.yaml:" in err and "invalid YAML" in err


def test_existing_run_is_refused_without_resume_or_overwrite(cli, tmp_path, tiny_model):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = cli("sft", "--model", tiny_model, "--data", "arith", "--output", out)
    assert code == 2 and "already exists" in err and "--resume" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_python_api_rejects_unknown_option(tiny_model):
    import align
    from align.errors import AlignError

    with pytest.raises(AlignError, match="unknown option 'learning_rate'"):
        align.sft(model=tiny_model, data="arith", output="x", learning_rate=1e-3)


def test_missing_model_on_hub_offline(cli, tmp_path):
    code, _, err = cli("sft", "--model", "someorg/nomodel", "--data", "arith", "--output", tmp_path / "r", "--max-steps", "1")
    assert code == 2 and "Cannot load" in err and "someorg/nomodel" in err


def test_repeated_list_flags_keep_every_value(tmp_path):
    from align.cli import build
    from align.config import parse_args

    top, parsers = build()
    argv = ["grpo", "--reward", "accuracy", "--reward", "closeness", "length", "--target-modules", "q_proj",
            "--target-modules", "v_proj"]
    cfg = parse_args(parsers["grpo"][1], top, argv, sub=parsers["grpo"][0])
    assert cfg.reward == ["accuracy", "closeness", "length"] and cfg.target_modules == ["q_proj", "v_proj"]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("reward: [format]\n")
    top, parsers = build()
    cfg = parse_args(parsers["grpo"][1], top, ["grpo", "--config", str(yaml_file)], sub=parsers["grpo"][0])
    assert cfg.reward == ["format"], "YAML value kept when no flag is given"
    top, parsers = build()
    cfg = parse_args(parsers["grpo"][1], top, ["grpo", "--config", str(yaml_file), "--reward", "a", "--reward", "b"],
                     sub=parsers["grpo"][0])
    assert cfg.reward == ["a", "b"], "flags replace the YAML list, and every repeated flag is kept"


def test_resume_never_touches_a_finished_run_nor_a_missing_one(cli, sft_run, tiny_model, tmp_path):
    before = {p: p.read_bytes() for p in sft_run.rglob("*") if p.is_file()}
    code, _, err = cli("sft", "--model", tiny_model, "--data", "arith", "--output", sft_run, "--resume")
    assert code == 2 and "is a completed run" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in sft_run.rglob("*") if p.is_file()} == before
    code, _, err = cli("sft", "--model", tiny_model, "--data", "arith", "--output", tmp_path / "nothing", "--resume")
    assert code == 2 and "nothing to resume" in err and not (tmp_path / "nothing").exists()


def test_resume_refuses_changed_options(cli, sft_run, tmp_path):
    import json
    import shutil

    run = tmp_path / "interrupted"
    shutil.copytree(sft_run, run)
    manifest = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**manifest, "status": "running"}))  # as a killed process leaves it
    cfg = manifest["config"]
    code, _, err = cli("sft", "--model", cfg["model"], "--data", "arith", "--eval-data", "arith-eval", "--output", run,
                       "--resume", "--lr", "0.05", "--batch-size", "8", "--max-steps", "20", "--no-packing")
    assert code == 2 and "--lr 0.003 (now 0.05)" in err and "--batch-size 16 (now 8)" in err
    assert json.loads((run / "run.json").read_text())["status"] == "running", "the refused resume wrote nothing"


def test_report_to_is_validated(cli, tiny_model, tmp_path):
    import importlib.util

    from align.runs import Run
    from align.stages.common import trainer_arguments
    from align.stages.sft import SFTConfig

    code, _, err = cli("sft", "--model", tiny_model, "--data", "arith", "-o", tmp_path / "x", "--report-to", "tensorbord")
    assert code == 2 and "--report-to tensorbord: unknown tracker" in err
    if importlib.util.find_spec("wandb") is None:
        code, _, err = cli("sft", "--model", tiny_model, "--data", "arith", "-o", tmp_path / "x", "--report-to", "wandb")
        assert code == 2 and "pip install wandb" in err
    # align logs to every tracker itself (tests/test_trackers.py): the trainers' own integrations stay off
    cfg = SFTConfig(model=tiny_model, data="arith", output=str(tmp_path / "x"), report_to=["tensorboard", "mlflow"])
    assert trainer_arguments(cfg, Run(cfg.output), False)["report_to"] == "none"


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(cli, sft_run, tiny_model, tmp_path):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(sft_run, run)
    before = (run / "run.json").read_text()
    code, _, err = cli("sft", "--model", tiny_model, "--data", "arith", "--output", run, "--overwrite",
                       "--target-modules", "q_proj", "no_such_proj", "--max-steps", "1")
    assert code == 2 and "--target-modules no_such_proj: not in this model" in err and "k_proj" in err
    assert (run / "run.json").read_text() == before and (run / "adapter").is_dir(), "the old run is untouched"


def test_generate_refuses_bad_sampling_values(cli, sft_run):
    code, _, err = cli("generate", sft_run, "--prompt", "What is 1 + 1?", "--temperature", "-1", "--top-p", "2")
    assert code == 2 and "--temperature must be >= 0" in err and "--top-p must be in (0, 1]" in err


def test_unpaired_preference_data_is_refused_by_sft(cli, tiny_model, tmp_path):
    import json

    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps({"prompt": "What is 1 + 1?", "completion": c, "label": c == "2"}) + "\n"
                            for c in ("2", "3")))
    code, _, err = cli("sft", "--model", tiny_model, "--data", data, "--output", tmp_path / "run")
    assert code == 2 and "unpaired preference data" in err and "align kto" in err
    assert not (tmp_path / "run").exists()


def test_damaged_inputs_are_user_errors_not_tracebacks(cli, sft_run, tiny_model, tmp_path):
    import shutil

    reward = tmp_path / "bad_reward.py"
    reward.write_text("def f(prompts, completions, **kw)\n    return [1.0] * len(prompts)\n")
    code, _, err = cli("rewards", "check", f"{reward}:f", "--data", "arith-prompts")
    assert code == 2 and f"{reward}:1: syntax error in reward file" in err and "Traceback" not in err

    parquet = tmp_path / "data.parquet"
    parquet.write_text("not parquet")
    code, _, err = cli("sft", "--model", tiny_model, "--data", parquet, "--output", tmp_path / "run")
    assert code == 2 and "not a readable parquet file" in err

    run = tmp_path / "truncated"
    shutil.copytree(sft_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for args in (["generate", run, "--prompt", "hi"], ["merge", run, "--output", tmp_path / "merged"]):
        code, _, err = cli(*args)
        assert code == 2 and f"{weights} has" in err and "(truncated or replaced)" in err, (args, err[-500:])


def test_remote_code_runs_only_with_the_explicit_flag(cli, sft_run, tmp_path):
    # a run trained with --trust-remote-code does not pass that trust on: loading it needs the flag again
    run = tmp_path / "trusting"
    shutil.copytree(sft_run, run)
    manifest = json.loads((run / "run.json").read_text())
    manifest["config"]["trust_remote_code"] = True
    (run / "run.json").write_text(json.dumps(manifest))
    code, _, err = cli("generate", run, "--prompt", "What is 1 + 1?", "--max-new-tokens", "2")
    assert code == 2 and "was trained with --trust-remote-code" in err and "Pass --trust-remote-code" in err
    code, out, err = cli("generate", run, "--prompt", "What is 1 + 1?", "--max-new-tokens", "2", "--trust-remote-code")
    assert code == 0, err
