"""The bad-input catalogue: a user's mistake, on every command, ends in exit 2 with one message naming the file /
line / field and the fix — never a traceback, never a run that starts. Each row is (case, command line, expected
message). With ALIGN_CATALOGUE_JSON=FILE the outcomes are written there; docs/make_bad_inputs.py renders them as
docs/BAD_INPUTS.md."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
OUTCOMES: dict[str, dict] = {}


@pytest.fixture(scope="module")
def ws(tiny_model, sft_run, tmp_path_factory) -> dict:
    """A workspace: the tiny model, an sft run, an rm run and files with the mistakes users make."""
    import align

    w = tmp_path_factory.mktemp("bad")
    rm = align.rm(from_run=str(sft_run), data="arith-prefs", output=str(w / "rm"), max_steps=1, tensorboard=False)
    (w / "bad.parquet").write_text("not parquet")
    (w / "syntax.py").write_text("def f(prompts, completions, **kw):\n    return [1.0 for c in completions\n")
    (w / "kto.jsonl").write_text(json.dumps({"prompt": "hi", "completion": "yo", "label": False}) + "\n")
    (w / "nolabel.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"prompt": "1 + 1?", "completion": "2", "label": True}, {"prompt": "1 + 2?", "completion": "5"})))
    (w / "intlabel.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"prompt": "1 + 1?", "completion": "2", "label": True}, {"prompt": "2 + 2?", "completion": "5", "label": 0})))
    (w / "noanswer.jsonl").write_text(json.dumps({"prompt": "What is 1 + 1?"}) + "\n")
    notok = w / "notok"
    notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model) / name, notok / name)
    from align.tiny import build_tiny_model

    build_tiny_model(w / "bert", arch="bert")  # an encoder checkpoint
    build_tiny_model(w / "small-vocab", vocab_size=256)  # ... given a tokenizer with more tokens than it embeds
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_model) / name, w / "small-vocab" / name)
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "1 + 1?", "completion": "2"}])}).save_to_disk(
        str(w / "only-train"))
    stage = "model: {t}\noutput: {w}/p\nstages:\n"
    (w / "typo.yaml").write_text(stage + "  - {{name: sft, kind: sft, data: arith, lrr: 0.1}}\n")
    (w / "kind.yaml").write_text(stage + "  - {{name: sft, kind: sfft, data: arith}}\n")
    (w / "syntax.yaml").write_text("model: x\nstages:\n  - {name: sft, kind: sft\n")
    (w / "dup.yaml").write_text(stage + "  - {{name: a, kind: sft, data: arith}}\n  - {{name: a, kind: dpo, data: arith-prefs}}\n")
    (w / "fwd.yaml").write_text(stage + "  - {{name: a, kind: dpo, from: b, data: arith-prefs}}\n  - {{name: b, kind: sft, data: arith}}\n")
    # the pipeline file checked whole (issue 19): defaults, eval block, gates, stage names, keys, output, encoding
    sft = "  - {{name: sft, kind: sft, data: arith, max_steps: 1}}\n"
    (w / "defaults.yaml").write_text("model: {t}\noutput: {w}/p\ndefaults: {{max_stpes: 1}}\nstages:\n" + sft)
    (w / "evalbad.yaml").write_text("model: {t}\noutput: {w}/p\neval: {{data: arith-prompts-eval, batch_size: 0}}\n"
                                    "stages:\n" + sft)
    (w / "gate.yaml").write_text("model: {t}\noutput: {w}/p\neval: {{data: arith-prompts-eval}}\nstages:\n"
                                 "  - {{name: sft, kind: sft, data: arith, gate: {{metric: acuracy, min_delta: abc}}}}\n")
    (w / "escape.yaml").write_text(stage + "  - {{name: ../../escaped, kind: sft, data: arith}}\n")
    (w / "dupkey.yaml").write_text(stage + "  - name: sft\n    kind: sft\n    data: arith\n    max_steps: 1\n"
                                   "    max_steps: 2\n")
    (w / "afile").write_text("not a directory\n")
    (w / "outfile.yaml").write_text("model: {t}\noutput: {w}/afile\nstages:\n" + sft)
    (w / "latin1.yaml").write_bytes(b"model: caf\xe9\noutput: out\n")
    (w / "torn").mkdir()
    (w / "torn" / "pipeline.json").write_text('{"pipeline": "torn.yaml", "stages": [{"name": "sf')
    (w / "torn.yaml").write_text("model: {t}\noutput: {w}/torn\nstages:\n" + sft)
    (w / "dangling").symlink_to(w / "gone")
    for name in ("typo", "kind", "dup", "fwd", "defaults", "evalbad", "gate", "escape", "dupkey", "outfile", "torn"):
        path = w / f"{name}.yaml"
        path.write_text(path.read_text().format(t=tiny_model, w=w))
    # files a user gives that cannot be read as they are, and reward modules that end the process
    (w / "latin1.jsonl").write_bytes(b'{"prompt": "1 + 1?", "completion": "2"}\n{"prompt": "caf\xe9?", "completion": "x"}\n')
    (w / "dupcfg.yaml").write_text("lr: 0.001\nmax_steps: 1\nlr: 0.002\n")
    (w / "same.jsonl").write_text("".join(json.dumps({"prompt": f"{i} + 1?", "chosen": "2", "rejected": "2"}) + "\n"
                                          for i in range(4)))
    (w / "exit_import.py").write_text("import sys\nsys.exit(3)\n")
    (w / "bad_import.py").write_text("import numpyy\n\ndef f(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    (w / "exit_call.py").write_text("import sys\n\ndef f(prompts, completions, **kw):\n    sys.exit(4)\n")
    (w / "pc.jsonl").write_text(json.dumps({"prompt": "1 + 1?", "completion": "2", "answer": "2"}) + "\n")
    badmetrics = w / "badmetrics"
    shutil.copytree(sft_run, badmetrics)
    (badmetrics / "metrics.jsonl").write_text('{"step": 1, "loss": \n' + (sft_run / "metrics.jsonl").read_text())
    trunc = w / "trunc"
    shutil.copytree(sft_run, trunc)
    weights = trunc / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (w / "ro").mkdir()  # a read-only file system, where this test may mount one (root); else that case skips
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(w / "ro")],
                             capture_output=True).returncode == 0 if shutil.which("mount") else False
    yield {"T": str(tiny_model), "S": str(sft_run), "R": str(rm), "W": w, "mounted": mounted}
    if mounted:
        subprocess.run(["umount", str(w / "ro")], capture_output=True)


def cases(T, S, R, W, mounted=False):
    D = str(HERE / "data")

    def O(name):  # noqa: E743 - a fresh output directory per case
        return str(W / "out" / name)

    return [
        ("sft-no-data", ["sft", "--model", T, "-o", O("a")],
         '--data is required'),
        ("sft-missing-data", ["sft", "--model", T, "--data", "missing.jsonl", "-o", O("a")],
         'Dataset not found: missing.jsonl'),
        ("sft-data-typo", ["sft", "--model", T, "--data", "reveiws", "-o", O("a")],
         "Dataset 'reveiws' is not a local file or directory, nor a bundled sample. Did you mean 'reviews'?"),
        ("sft-malformed", ["sft", "--model", T, "--data", f"{D}/malformed.jsonl", "-o", O("a")],
         'malformed.jsonl:3: malformed JSON'),
        ("sft-empty", ["sft", "--model", T, "--data", f"{D}/empty.jsonl", "-o", O("a")],
         'the dataset is empty'),
        ("sft-unknown-format", ["sft", "--model", T, "--data", f"{D}/unknown_format.jsonl", "-o", O("a")],
         'cannot detect the dataset format. Columns found: foo, bar'),
        ("sft-nonstring", ["sft", "--model", T, "--data", f"{D}/nonstring.jsonl", "-o", O("a")],
         "nonstring.jsonl:2: field 'messages[1].content' must be a string"),
        ("sft-bad-parquet", ["sft", "--model", T, "--data", str(W / "bad.parquet"), "-o", O("a")],
         'bad.parquet: not a readable parquet file'),
        ("sft-neg-lr", ["sft", "--model", T, "--data", "arith", "--lr", "-1", "-o", O("a")],
         '--lr must be positive, got -1.0'),
        ("sft-adapter-typo", ["sft", "--model", T, "--data", "arith", "--adapter", "lorra", "-o", O("a")],
         "Unknown adapter kind 'lorra'. Did you mean 'lora'?"),
        ("sft-unknown-flag", ["sft", "--model", T, "--data", "arith", "--lora-rank", "8", "-o", O("a")],
         "unrecognized arguments: --lora-rank 8 (--lora-rank: Did you mean '--lora-r'?)"),
        ("sft-bad-choice", ["sft", "--model", T, "--data", "arith", "--lr-scheduler", "cosinus", "-o", O("a")],
         "Unknown schedule 'cosinus'. Did you mean 'cosine'?"),
        ("sft-not-int", ["sft", "--model", T, "--data", "arith", "--max-steps", "ten", "-o", O("a")],
         "argument --max-steps/--max_steps: invalid int value: 'ten'"),
        ("sft-missing-model", ["sft", "--model", "./nope", "--data", "arith", "-o", O("a")],
         '--model ./nope: no such directory'),
        ("sft-target-modules", ["sft", "--model", T, "--data", "arith", "--target-modules", "nope_proj", "-o", O("a")],
         '--target-modules nope_proj: not in this model'),
        ("sft-kto", ["sft", "--model", T, "--data", str(W / "kto.jsonl"), "-o", O("a")],
         "unpaired preference data (TRL's KTO format)"),
        ("sft-encoder", ["sft", "--model", str(W / "bert"), "--data", "arith", "-o", O("a")],
         "is an encoder model (bert: it attends in both directions), not a causal LM"),
        ("sft-vocab", ["sft", "--model", str(W / "small-vocab"), "--data", "arith", "-o", O("a")],
         "The tokenizer has 1024 tokens, but the model embeds only 259"),
        ("sft-split-on-file", ["sft", "--model", T, "--data", "arith", "--split", "test", "-o", O("a")],
         "is a single file with no splits. Drop --split"),
        ("sft-eval-split", ["sft", "--model", T, "--data", "arith", "--eval-data", str(W / "only-train"), "-o", O("a")],
         "has the splits train, none of them test or validation or eval or dev. Choose one with --eval-data-split NAME"),
        ("sft-read-only", ["sft", "--model", T, "--data", "arith", "-o", str(W / "ro" / "run")],
         "ro is not writable (a read-only file system, or no permission)"),
        ("sft-from-missing", ["sft", "--from", str(W / "nope"), "--data", "arith", "-o", O("a")],
         'no such directory. Pass the --output directory of a finished stage'),
        ("sft-resume-missing", ["sft", "--model", T, "--data", "arith", "-o", O("never"), "--resume"],
         'holds no align run (no run.json); nothing to resume'),
        ("sft-output-exists", ["sft", "--model", T, "--data", "arith", "-o", S],
         'already exists and is not empty. Pass --resume to continue that run, --overwrite'),
        ("sft-resume-completed", ["sft", "--model", T, "--data", "arith", "-o", S, "--resume"],
         'is a completed run, and a finished run is never modified'),
        ("sft-dropout", ["sft", "--model", T, "--data", "arith", "--lora-dropout", "1.5", "-o", O("a")],
         '--lora-dropout must be in [0, 1), got 1.5'),
        ("sft-batch0", ["sft", "--model", T, "--data", "arith", "--batch-size", "0", "-o", O("a")],
         '--batch-size must be positive, got 0'),
        ("sft-no-tokenizer", ["sft", "--model", str(W / "notok"), "--data", "arith", "-o", O("a")],
         'has no tokenizer (tokenizer.json, tokenizer_config.json missing)'),
        ("sft-max-length", ["sft", "--model", T, "--data", "arith", "--max-length", "100000", "-o", O("a")],
         "--max-length 100000 exceeds the model's 1024 positions"),
        ("sft-report-to", ["sft", "--model", T, "--data", "arith", "--report-to", "nosuch", "-o", O("a")],
         '--report-to nosuch: unknown tracker'),
        ("sft-no-model", ["sft", "--data", "arith", "-o", O("a")],
         '--model is required'),
        ("sft-no-output", ["sft", "--model", T, "--data", "arith"],
         '--output is required'),
        ("sft-num-processes", ["sft", "--model", T, "--data", "arith", "--num-processes", "0", "-o", O("a")],
         '--num-processes must be at least 1, got 0'),
        ("sft-accelerate-preset", ["sft", "--model", T, "--data", "arith", "--accelerate-config", "zero9", "-o", O("a")],
         "--accelerate-config zero9: neither a preset (ddp, zero2, zero3, fsdp2) nor an existing accelerate config file. Did you mean"),
        *([("sft-no-deepspeed", ["sft", "--model", T, "--data", "arith", "--accelerate-config", "zero3", "-o", O("a")],
            "uses DeepSpeed, which is not installed (pip install deepspeed)")]
          if importlib.util.find_spec("deepspeed") is None else []),
        ("rm-prompts", ["rm", "--from", S, "--data", "arith-prompts", "-o", O("b")],
         'neither preference pairs (chosen/rejected) nor labelled rows (a \'label\' or \'score\' column). Columns found: '
         'prompt, answer.'),
        ("rm-no-data", ["rm", "--from", S, "-o", O("b")],
         '--data is required'),
        ("dpo-sft-data", ["dpo", "--from", S, "--data", "arith", "-o", O("c")],
         'not a preference dataset. Columns found: messages'),
        ("dpo-beta", ["dpo", "--from", S, "--data", "arith-prefs", "--beta", "-1", "-o", O("c")],
         '--beta must be positive, got -1.0'),
        ("dpo-encoder", ["dpo", "--model", str(W / "bert"), "--data", "arith-prefs", "-o", O("c")],
         "is an encoder model (bert"),
        ("dpo-from-rm", ["dpo", "--from", R, "--data", "arith-prefs", "-o", O("c")],
         "a 'rm' run cannot be the policy parent of dpo"),
        ("dpo-from-file", ["dpo", "--from", f"{D}/alpaca.json", "--data", "arith-prefs", "-o", O("c")],
         'no such directory. Pass the --output directory of a finished stage'),
        ("dpo-from-truncated", ["dpo", "--from", str(W / "trunc"), "--data", "arith-prefs", "-o", O("c")],
         'were recorded (truncated or replaced)'),
        ("grpo-no-reward", ["grpo", "--from", S, "--data", "arith-prompts", "-o", O("d")],
         'Give at least one reward'),
        ("grpo-reward-typo", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "acuracy", "-o", O("d")],
         "Unknown reward 'acuracy'. Did you mean 'accuracy'?"),
        ("grpo-one-gen", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--num-generations", "1", "-o", O("d")],
         '--num-generations must be at least 2'),
        ("grpo-batch-multiple", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--batch-size", "7", "-o", O("d")],
         '--batch-size 7 must be a multiple of --num-generations 4'),
        ("grpo-reward-syntax", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", f"{W}/syntax.py:f", "-o", O("d")],
         'syntax.py:2: syntax error in reward file'),
        ("grpo-weight", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy@heavy", "-o", O("d")],
         "the weight after '@' must be a number, got 'heavy'"),
        ("grpo-settings", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "length(max_length=2, cache=5)", "-o", O("d")],
         "bad settings for 'length'"),
        ("grpo-no-answer", ["grpo", "--from", S, "--data", str(W / "noanswer.jsonl"), "--reward", "accuracy", "-o", O("d"), "--max-steps", "1", "--batch-size", "4"],
         "reward 'accuracy' reads the 'answer' column, which the data lacks"),
        ("grpo-factory-no-parens", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "reward_plugins:make_constant", "-o", O("d")],
         "call it: 'reward_plugins:make_constant()'"),
        ("grpo-is-hf", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--backend", "hf", "--is-correction", "token_mask", "-o", O("d")],
         "--is-correction token_mask needs the sampler's log-probs"),
        ("grpo-sync-hf", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--backend", "hf", "--sync-check", "2", "-o", O("d")],
         '--sync-check compares the vllm sampler with the trainer'),
        ("grpo-vllm-memory", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--backend", "vllm", "--num-processes", "2", "--vllm-memory", "0.5", "-o", O("d")],
         "--vllm-memory 0.5 with 2 processes: on CPU every process's vLLM engine takes that fraction of the host RAM"),
        ("grpo-temperature", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--temperature", "-1", "-o", O("d")],
         '--temperature'),
        ("ppo-no-reward", ["ppo", "--from", S, "--data", "arith-prompts", "-o", O("e")],
         'Give at least one reward'),
        ("ppo-rm-not-rm", ["ppo", "--from", S, "--data", "arith-prompts", "--reward-model", S, "-o", O("e")],
         "is a 'sft' run, not a reward model (align rm)"),
        ("ppo-prompt-adapter", ["ppo", "--model", T, "--adapter", "prompt", "--data", "arith-prompts", "--reward", "accuracy", "-o", O("e")],
         '--adapter prompt: ppo keeps actor, frozen reference and critic as adapters of one PEFT model'),
        ("ppo-critic-init", ["ppo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--critic-init", "reward_model", "-o", O("e")],
         '--critic-init reward_model needs --reward-model RM_RUN'),
        ("ppo-fsdp", ["ppo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--accelerate-config", "fsdp2", "-o", O("e")],
         "ppo's own loop is data parallel (DDP) only; FSDP is for the TRL stages"),
        ("ppo-keep-best-no-eval", ["ppo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--keep-best", "eval/score", "-o", O("e")],
         "--keep-best eval/score: compares held-out metrics, and this run has no held-out data"),
        ("ppo-keep-best-no-gold", ["ppo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--eval-split", "0.1", "--keep-best", "eval/gold/accuracy/mean", "-o", O("e")],
         "this run logs no eval/gold/accuracy/mean"),
        ("ppo-gold-is-proxy", ["ppo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--gold-reward", "accuracy", "-o", O("e")],
         "--gold-reward accuracy is also a training reward"),
        ("grpo-gold-unknown", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--gold-reward", "acuracy", "-o", O("d")],
         "--gold-reward: Reward spec: Unknown reward 'acuracy'. Did you mean 'accuracy'?"),
        ("sft-keep-best-loss", ["sft", "--model", T, "--data", "arith", "--eval-split", "0.1", "--keep-best", "eval_loss", "-o", O("a")],
         "say whether lower or higher is better: eval_loss:min"),
        ("pairs-one-gen", ["pairs", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--num-generations", "1", "-o", O("f")],
         '--num-generations must be at least 2 (a pair needs two completions)'),
        ("pairs-greedy", ["pairs", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--temperature", "0", "-o", O("f")],
         '--temperature must be > 0'),
        ("pairs-no-source", ["pairs", "--data", "arith-prompts", "--reward", "accuracy", "-o", O("f")],
         'Give the policy to sample from: --from RUN'),
        ("eval-no-data", ["eval", S],
         '--data is required'),
        ("eval-missing", ["eval", "./nope", "--data", "arith-prompts-eval"],
         './nope: no such directory'),
        ("eval-path-typo", ["eval", str(W / "rmm"), "--data", "arith-prompts-eval"],
         f"rmm: no such directory. Did you mean '{W / 'rm'}'?"),
        ("eval-dir-of-runs", ["eval", str(W), "--data", "arith-prompts-eval"],
         "neither a run directory (no run.json) nor a model directory (no config.json). It holds runs; give one of"),
        ("eval-greedy-k", ["eval", S, "--data", "arith-prompts-eval", "--num-samples", "4"],
         '--num-samples 4 with greedy decoding gives identical samples'),
        ("eval-top-p", ["eval", S, "--data", "arith-prompts-eval", "--top-p", "2"],
         '--top-p must be in (0, 1], got 2.0'),
        ("eval-rm-on-prompts", ["eval", R, "--data", "arith-prompts-eval"],
         'is a reward model: evaluate it on preference pairs'),
        ("generate-temperature", ["generate", S, "--prompt", "hi", "--temperature", "-1"],
         '--temperature must be >= 0'),
        ("generate-rm", ["generate", R, "--prompt", "hi"],
         'is a reward model (align rm): it scores text, it does not generate'),
        ("generate-encoder", ["generate", str(W / "bert"), "--prompt", "hi"],
         "is an encoder model (bert"),
        ("generate-missing", ["generate", "./nope", "--prompt", "hi"],
         './nope: no such directory'),
        ("generate-truncated", ["generate", str(W / "trunc"), "--prompt", "hi"],
         'were recorded (truncated or replaced)'),
        ("merge-missing", ["merge", "./nope", "-o", O("m")],
         './nope: no such directory. Give a run directory'),
        ("merge-truncated", ["merge", str(W / "trunc"), "-o", O("m")],
         'were recorded (truncated or replaced)'),
        ("run-missing", ["run", str(W / "missing.yaml")],
         'Pipeline file not found'),
        ("run-typo", ["run", str(W / "typo.yaml")],
         "stage 'sft': unknown option 'lrr'. Did you mean 'lr'?"),
        ("run-kind", ["run", str(W / "kind.yaml")],
         "Unknown stage kind 'sfft'. Did you mean 'sft'?"),
        ("run-syntax", ["run", str(W / "syntax.yaml")],
         'syntax.yaml:4: invalid YAML'),
        ("run-dup", ["run", str(W / "dup.yaml")],
         "stage name 'a' is used twice"),
        ("run-forward", ["run", str(W / "fwd.yaml")],
         "from 'b' refers to a stage that comes later"),
        ("report-missing", ["report", str(W / "nope")],
         'no such directory'),
        # issue 19: the pipeline file checked whole before anything trains
        ("run-defaults-typo", ["run", str(W / "defaults.yaml")],
         "defaults: unknown option 'max_stpes'. Did you mean 'max_steps'?"),
        ("run-eval-block", ["run", str(W / "evalbad.yaml")],
         "eval: --batch-size must be positive, got 0"),
        ("run-gate-metric", ["run", str(W / "gate.yaml")],
         "gate: Unknown metric 'acuracy'. Did you mean 'accuracy'? Available: accuracy, completion_length, kl"),
        ("run-gate-delta", ["run", str(W / "gate.yaml")],
         "gate: min_delta must be a finite number"),
        ("run-escaped-name", ["run", str(W / "escape.yaml")],
         "stage name '../../escaped' is not allowed"),
        ("run-duplicate-key", ["run", str(W / "dupkey.yaml")],
         "dupkey.yaml:8: invalid YAML: duplicate key 'max_steps' (also on line 7)"),
        ("run-output-file", ["run", str(W / "outfile.yaml")],
         "output: " + str(W / "afile") + " is a file, not a directory"),
        ("run-not-utf8", ["run", str(W / "latin1.yaml")],
         "latin1.yaml:1: not UTF-8 text (byte 10: 0xe9). Save the file as UTF-8"),
        ("run-torn-summary", ["run", str(W / "torn.yaml")],
         "pipeline.json:1: corrupt pipeline summary"),
        ("report-torn-summary", ["report", str(W / "torn")],
         "pipeline.json:1: corrupt pipeline summary"),
        ("report-corrupt-metrics", ["report", str(W / "badmetrics")],
         "metrics.jsonl:1: corrupt line"),
        # issue 19: reading what the user gave, output paths of the wrong kind
        ("sft-not-utf8", ["sft", "--model", T, "--data", str(W / "latin1.jsonl"), "-o", O("a")],
         "latin1.jsonl:2: not UTF-8 text"),
        ("sft-config-duplicate", ["sft", "--config", str(W / "dupcfg.yaml"), "--model", T, "--data", "arith", "-o", O("a")],
         "dupcfg.yaml:3: invalid YAML: duplicate key 'lr' (also on line 1)"),
        ("sft-output-dangling", ["sft", "--model", T, "--data", "arith", "-o", str(W / "dangling")],
         "is a symbolic link to"),
        ("sft-output-under-file", ["sft", "--model", T, "--data", "arith", "-o", str(W / "afile" / "run")],
         "is a file, so nothing can be created under it"),
        ("grpo-reward-exits", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", f"{W}/exit_import.py:f", "-o", O("d")],
         "importing " + str(W / "exit_import.py") + " called sys.exit(3) at"),
        ("grpo-reward-import", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", f"{W}/bad_import.py:f", "-o", O("d")],
         "raised ModuleNotFoundError: No module named 'numpyy'"),
        ("check-reward-exits", ["rewards", "check", f"{W}/exit_call.py:f", "--data", str(W / "pc.jsonl")],
         "Reward function 'f' (spec '" + f"{W}/exit_call.py:f" + "') called sys.exit(4)"),
        ("grpo-weight-nan", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy@nan", "-o", O("d")],
         "the weight after '@' must be a finite number, got 'nan'"),
        ("kto-missing-label", ["kto", "--from", S, "--data", str(W / "nolabel.jsonl"), "-o", O("k")],
         "nolabel.jsonl:2: missing field 'label' (true = desirable, false = undesirable)"),
        ("kto-label-not-boolean", ["kto", "--from", S, "--data", str(W / "intlabel.jsonl"), "-o", O("k")],
         "intlabel.jsonl:2: field 'label' must be true or false (a boolean: true = desirable), got 0"),
        ("kto-one-label", ["kto", "--from", S, "--data", str(W / "kto.jsonl"), "-o", O("k")],
         "every one of the 1 rows has label false (undesirable). KTO needs both desirable and undesirable"),
        ("kto-sft-data", ["kto", "--from", S, "--data", "arith", "-o", O("k")],
         "not unpaired feedback. Columns found: messages. Expected prompt/completion/label"),
        ("kto-batch-1", ["kto", "--from", S, "--data", "arith-prefs", "--batch-size", "1", "-o", O("k")],
         "--batch-size 1: --loss kto estimates its KL baseline from the other completions of the batch"),
        ("kto-from-rm", ["kto", "--from", R, "--data", "arith-prefs", "-o", O("k")],
         "a 'rm' run cannot be the policy parent of kto"),
        ("orpo-from-rm", ["orpo", "--from", R, "--data", "arith-prefs", "-o", O("k")],
         "a 'rm' run cannot be the policy parent of orpo"),
        ("orpo-unpaired-data", ["orpo", "--from", S, "--data", str(W / "nolabel.jsonl"), "-o", O("k")],
         "not a preference dataset. Columns found: prompt, completion, label"),
        ("simpo-gamma", ["simpo", "--from", S, "--data", "arith-prefs", "--gamma", "-1", "-o", O("k")],
         "--gamma"),
        ("simpo-ptuning", ["simpo", "--model", T, "--data", "arith-prefs", "--adapter", "ptuning", "-o", O("k")],
         "--adapter ptuning: it prepends virtual tokens to the logits, and TRL's experimental CPOTrainer"),
        ("pairs-unpaired-per-prompt", ["pairs", "--from", S, "--data", "arith-prompts", "--reward", "accuracy",
                                       "--unpaired", "--pairs-per-prompt", "2", "-o", O("f")],
         "--pairs-per-prompt 2: --unpaired writes every distinct completion, not pairs"),
        ("pairs-score-without-unpaired", ["pairs", "--from", S, "--data", "arith-prompts", "--reward", "accuracy",
                                          "--desirable-score", "1", "-o", O("f")],
         "--desirable-score 1.0 labels unpaired feedback; add --unpaired"),
        ("dpo-identical-pairs", ["dpo", "--from", S, "--data", str(W / "same.jsonl"), "-o", O("c")],
         "in every pair 'chosen' equals 'rejected'"),
        # issue 19: ranges of numeric options, negative numbers as values
        ("sft-neg-lr-exponent", ["sft", "--model", T, "--data", "arith", "--lr", "-1e-3", "-o", O("a")],
         "--lr must be positive, got -0.001"),
        ("sft-nan-lr", ["sft", "--model", T, "--data", "arith", "--lr", "nan", "-o", O("a")],
         "--lr must be a finite number, got nan"),
        ("sft-neg-seed", ["sft", "--model", T, "--data", "arith", "--seed", "-1", "-o", O("a")],
         "--seed must be in [0, 4294967295], got -1"),
        ("sft-max-length-1", ["sft", "--model", T, "--data", "arith", "--max-length", "1", "-o", O("a")],
         "--max-length 1: no training example keeps a token to train on"),
        ("dpo-max-length-1", ["dpo", "--from", S, "--data", "arith-prefs", "--max-length", "1", "-o", O("c")],
         "No training example is left after preparing the data for the trainer (--max-length 1"),
        ("ppo-gamma", ["ppo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--gamma", "2", "-o", O("e")],
         "--gamma must be in [0, 1], got 2.0"),
        ("tiny-no-heads", ["tiny-model", "-o", O("t"), "--num-heads", "0"],
         "--num-heads must be >= 1, got 0"),
        ("check-no-spec", ["rewards", "check", "--data", "arith-prompts"],
         'Give at least one reward spec'),
        ("check-gens-no-from", ["rewards", "check", "accuracy", "--data", "arith-prompts", "--num-generations", "4"],
         '--num-generations needs --from RUN'),
        ("inspect-missing", ["data", "inspect", str(W / "nope.jsonl")],
         'Dataset not found'),
        ("inspect-model-missing", ["data", "inspect", "arith", "--model", str(W / "nomodel")],
         '--model'),
        ("tiny-heads", ["tiny-model", "-o", O("t"), "--hidden-size", "30", "--num-heads", "4"],
         '--hidden-size 30 must be divisible by --num-heads 4'),
        ("rm-score-sft", ["rm-score", S, "--data", "arith-prefs"],
         "is a 'sft' run, not a reward model (align rm)"),
        ("unknown-command", ["sftt"],
         "invalid choice: 'sftt'"),
        ("distill-no-teacher", ["distill", "--from", S, "--data", "arith-prompts", "-o", O("d")],
         "--teacher is required"),
        ("distill-teacher-rm", ["distill", "--from", S, "--teacher", R, "--data", "arith-prompts", "-o", O("d")],
         "a 'rm' run cannot be the teacher of distill; use a policy run"),
        ("distill-teacher-vocab", ["distill", "--from", S, "--teacher", str(W / "small-vocab"), "--data",
                                   "arith-prompts", "-o", O("d")],
         "its vocab_size is 259 (config.json of"),
        ("distill-beta-without-jsd", ["distill", "--from", S, "--teacher", S, "--beta", "0.3", "--data",
                                      "arith-prompts", "-o", O("d")],
         "--beta 0.3 weighs the generalized JSD; --divergence reverse_kl has no β"),
        ("distill-teacher-not-found", ["distill", "--from", S, "--teacher", "no-such-teacher", "--data",
                                       "arith-prompts", "-o", O("d")],
         "Cannot load model config 'no-such-teacher'"),
        ("grpo-tool-typo", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--tool",
                            "calculater", "-o", O("d")],
         "Unknown tool 'calculater'. Did you mean 'calculator'?"),
        ("grpo-async-tools", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--tool",
                              "calculator", "--async", "-o", O("d")],
         "--async samples single-turn rollouts"),
        ("grpo-staleness-without-async", ["grpo", "--from", S, "--data", "arith-prompts", "--reward", "accuracy",
                                          "--max-staleness", "3", "-o", O("d")],
         "--max-staleness 3 bounds --async sampling"),
        ("pairs-tool-typo", ["pairs", "--from", S, "--data", "arith-prompts", "--reward", "accuracy", "--tool",
                             "calculater", "-o", O("f")],
         "Unknown tool 'calculater'. Did you mean 'calculator'?"),
        ("pairs-tool-calls-without-tool", ["pairs", "--from", S, "--data", "arith-prompts", "--reward", "accuracy",
                                           "--max-tool-calls", "2", "-o", O("f")],
         "--max-tool-calls 2 applies to multi-turn rollouts with tools; add --tool SPEC or --environment SPEC"),
    ]


CASE_NAMES = [c[0] for c in cases("T", "S", "R", Path("W"))]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gives_one_clear_error(cli, ws, name):
    if name == "sft-read-only" and not ws["mounted"]:
        pytest.skip("no read-only file system could be mounted here (needs root)")
    (case,) = [c for c in cases(**ws) if c[0] == name]
    _, args, expected = case
    code, out, err = cli(*args)
    OUTCOMES[name] = {"command": "align " + " ".join(_short(a, ws) for a in args), "exit": code,
                      "message": _short(err.strip().splitlines()[-1].strip().removeprefix("- "), ws) if err.strip() else ""}
    assert code == 2, (code, err[-2000:])
    assert expected in err, err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out
    assert err.count(" error: ") == 1, err  # one message, not printed twice
    written = [p for p in (ws["W"] / "out").glob("*") if any(p.iterdir())] if (ws["W"] / "out").exists() else []
    assert not written, f"a refused command wrote {written}"


def _short(arg: str, ws: dict) -> str:
    """Case arguments with the workspace paths as names a reader recognises."""
    for key, label in (("R", "RM_RUN"), ("S", "SFT_RUN"), ("T", "MODEL")):
        arg = arg.replace(ws[key], label)
    root = str(HERE.parent) + "/"
    return arg.replace(str(ws["W"]) + "/", "").replace(str(ws["W"]), "WORK").replace(root, "")


def teardown_module() -> None:
    target = os.environ.get("ALIGN_CATALOGUE_JSON")
    if target and OUTCOMES:
        Path(target).write_text(json.dumps(OUTCOMES, indent=1) + "\n")
