"""Tools and multi-turn rollouts (align.rewards.tools, align.stages.tool_rollout): the calculator, guarded tool calls
(a tool that raises, hangs or returns garbage), environments' state per rollout, bad specs refused at validation, a
tool called mid-rollout with its result in the next turn (masks checked token by token), and a grpo run with the
calculator that logs the tool metrics."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_S

PLUGINS = Path(__file__).parent / "tool_plugins.py"
DATA = Path(__file__).parent / "data"


def _spec(name: str) -> str:
    return f"{PLUGINS}:{name}"


@pytest.fixture(scope="module")
def tool_policy(tmp_path_factory) -> Path:
    """A tiny model fine-tuned on four calculator traces (tests/data/tool_traces.jsonl, 3-4-digit × 2-digit):
    it has learnt the call format, so its rollouts call the calculator. Two heads (head_dim 64): vLLM's CPU attention
    has no kernel for head_dim 16."""
    import align
    from align.tiny import build_tiny_model

    base = build_tiny_model(tmp_path_factory.mktemp("tools") / "base", split_digits=True, initializer_range=0.02, seed=1)
    return align.sft(model=str(base), data=str(DATA / "tool_traces.jsonl"), adapter="full", lr=3e-3,
                     lr_scheduler="constant_with_warmup", warmup=0.05, batch_size=4, max_length=700, max_steps=100,
                     logging_steps=50, output=tmp_path_factory.mktemp("tools") / "sft", tensorboard=False)


def test_calculator_is_exact_and_never_evaluates_code():
    from align.rewards.tools import calculator

    assert calculator("4821 * 37") == "178377"
    assert calculator("7 / 2") == "3.5" and calculator("(1 + 2) ** 3 - -1") == "28" and calculator("1,234 + 1") == "1235"
    assert calculator("__import__('os').system('true')").startswith("error: unsupported element")
    assert calculator("2 ** 100000").startswith("error:") and calculator("1 / 0") == "error: division by zero"
    assert calculator("12 +").startswith("error: cannot parse")


def test_a_tool_that_raises_hangs_or_returns_garbage_becomes_an_error_message_and_is_counted():
    from align.rewards.tools import ToolSet, ToolStats

    tools = ToolSet.resolve([_spec("boom"), _spec("hang"), _spec("garbage"), _spec("double")], None, timeout=0.5)
    rollout, stats = tools.for_rollout(), ToolStats()
    assert rollout.call({"name": "boom", "arguments": {"x": 3}}, stats) == ("boom", "error: boom raised RuntimeError: boom 3")
    assert rollout.call({"name": "hang", "arguments": {"x": 1}}, stats) == ("hang", "error: hang timed out after 0.5s")
    assert rollout.call({"name": "garbage", "arguments": {"x": 1}}, stats) == \
        ("garbage", "error: garbage returned a object, which is neither text nor JSON")
    assert rollout.call({"name": "double", "arguments": {"x": 4}}, stats) == ("double", '{"value": 8}')
    assert rollout.call({"name": "double", "arguments": {"y": 4}}, stats)[1].startswith("error: double raised TypeError")
    assert rollout.call({"name": "nope", "arguments": {}}, stats)[1] == \
        "error: unknown tool 'nope'; available: boom, double, garbage, hang"
    assert (stats.calls, stats.errors, stats.timeouts) == (6, 4, 1)


def test_tool_calls_are_parsed_from_the_model_text():
    from align.rewards.tools import parse_tool_calls

    text = 'x<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 + 2"}}\n</tool_call><tool_call>{oops</tool_call>'
    calls = parse_tool_calls(text)
    assert calls[0] == {"name": "calculator", "arguments": {"expression": "1 + 2"}}
    assert isinstance(calls[1], str) and "is not JSON" in calls[1]
    assert parse_tool_calls("19") == []


def test_an_environment_keeps_its_state_per_rollout():
    from align.rewards.tools import ToolSet, ToolStats

    tools = ToolSet.resolve([], _spec("Counter"))
    first, second, stats = tools.for_rollout(), tools.for_rollout(), ToolStats()
    assert sorted(first.tools) == ["increment"]  # public methods, reset aside
    assert [s["function"]["name"] for s in tools.schemas()] == ["increment"]
    assert first.call({"name": "increment", "arguments": {"by": 2}}, stats)[1] == "2"
    assert first.call({"name": "increment", "arguments": {"by": 3}}, stats)[1] == "5"
    assert second.call({"name": "increment", "arguments": {"by": 1}}, stats)[1] == "1"
    assert (first.environment.count, second.environment.count) == (5, 1) and first.environment is not second.environment


def test_bad_tool_specs_are_refused_before_any_model_loads(cli, tmp_path):
    code, _, err = cli("grpo", "--model", tmp_path / "no-model", "--data", "mult-prompts", "--reward", "accuracy",
                       "--tool", "calculater", "--tool", _spec("undocumented"), "--environment", _spec("boom"),
                       "--output", tmp_path / "out")
    assert code == 2
    assert "Tool spec: Unknown tool 'calculater'. Did you mean 'calculator'? Available: calculator." in err
    assert f"Tool spec '{_spec('undocumented')}': no JSON schema for 'undocumented'" in err and "`Args:` section" in err
    assert f"Environment spec '{_spec('boom')}': making an instance raised TypeError" in err
    assert not (tmp_path / "out").exists()
    code, out, _ = cli("tools", "list", "--tool", "calculator")
    assert code == 0 and "tools (--tool NAME): calculator" in out and '"name": "calculator"' in out


def test_accuracy_reads_the_model_last_turn_never_a_tool_result():
    from align.rewards.builtin import accuracy, closeness

    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "4898 * 85"}}\n</tool_call>'
    answered = [{"role": "assistant", "content": call}, {"role": "tool", "name": "calculator", "content": "416330"},
                {"role": "assistant", "content": "416330"}]
    silent = [*answered[:2], {"role": "assistant", "content": ""}]  # called, then said nothing
    texts = [f"{call}\n416330\n416330", f"{call}\n416330\n"]  # what `completions` holds: tool results included
    columns = {"answer": ["416330", "416330"], "conversation": [answered, silent]}
    assert accuracy()(["q", "q"], texts, **columns) == [1.0, 0.0]
    assert closeness(scale=10)(["q", "q"], texts, **columns) == [1.0, 0.0]
    assert accuracy()(["q"], ["416330"], answer=["416330"]) == [1.0]  # single-turn: the completion itself


def test_the_tiny_template_renders_tools_in_one_line_each_and_calls_qwen_style(tmp_path):
    from align.rewards.tools import ToolSet
    from align.tiny import build_tokenizer

    tok = build_tokenizer(split_digits=True)
    tools = ToolSet.resolve(["calculator", _spec("double")], None).schemas()
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2 * 3"}}}
    messages = [{"role": "user", "content": "What is 2 * 3?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "calculator", "content": "6"}, {"role": "assistant", "content": "6"}]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    system = text.split("<|im_end|>")[0]
    assert system == ("<|im_start|>system\n# Tools\ncalculator(expression: string): Evaluate an arithmetic expression "
                      "exactly.\ndouble(x: integer): Twice x, as a JSON object.")
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 * 3"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n6\n</tool_response><|im_end|>" in text
    assert tok.apply_chat_template(messages[:1], tokenize=False) == "<|im_start|>user\nWhat is 2 * 3?<|im_end|>\n"


def test_the_demo_data_is_generated_the_same_every_time_and_disjoint_from_the_held_out_set():
    from align.data.loading import load_records

    traces, direct = load_records("mult-tools"), load_records("mult-direct")
    assert len(traces) == len(direct) == 6000 and traces.sha256 == load_records("mult-tools").sha256
    assert traces.path is None and traces.describe()["generated"] == "align.data.samples"
    questions = [r["messages"][0]["content"] for r in traces.rows]
    assert questions == [r["messages"][0]["content"] for r in direct.rows]  # the same problems, with and without tool
    first = traces.rows[0]["messages"]
    a, b = map(int, re.findall(r"\d+", questions[0]))
    assert first[1]["tool_calls"][0]["function"]["arguments"] == {"expression": f"{a} * {b}"}
    assert first[2]["content"] == first[3]["content"] == direct.rows[0]["messages"][1]["content"] == str(a * b)
    held = {r["prompt"] for r in load_records("mult-eval").rows} | {r["prompt"] for r in load_records("mult-prompts").rows}
    assert len(held) == 500 and not held & set(questions)
    with pytest.raises(Exception, match="--split test: mult-tools is a bundled dataset with no splits"):
        load_records("mult-tools", "test")


def test_pipeline_eval_without_tools_needs_tools_and_adds_a_column(cli, tmp_path):
    from align.pipeline import format_table, table_rows

    path = tmp_path / "p.yaml"
    path.write_text(f"model: {tmp_path}\noutput: {tmp_path / 'out'}\neval: {{data: mult-eval, without_tools: yes}}\n"
                    "stages:\n  - {name: sft, kind: sft, data: mult-tools}\n")
    code, _, err = cli("run", path, "--dry-run")
    assert code == 2 and "eval: without_tools: true evaluates each policy a second time without the eval block's " \
        "tools, but it names none; set tool (or environment), or drop without_tools." in err
    rows = table_rows({"accuracy": 0.0, "without_tools": {"accuracy": 0.0}},
                      [{"name": "sft", "kind": "sft", "from": "base", "eval": {"accuracy": 0.93, "without_tools":
                                                                               {"accuracy": 0.01}}}])
    assert rows[1]["accuracy_without_tools"] == 0.01
    table = format_table(rows).splitlines()
    assert table[0].split()[-3:] == ["acc.", "without", "tools"] and table[2].split()[3] == "93.0%"
    assert table[2].split()[-1] == "1.0%"
    assert "without tools" not in format_table(table_rows({"accuracy": 0.5}, []))  # no such column otherwise


def test_a_tool_is_called_mid_rollout_and_only_the_model_tokens_are_trained(tool_policy):
    """Greedy rollouts of the calculator-tuned model: each tool result is the calculator's answer to the call, it sits
    between two model turns, and the mask is 0 exactly on its rendered tokens and 1 on every token the model made."""
    from align.data.prompts import load_prompts
    from align.generate import load_target
    from align.rewards.tools import ToolSet, calculator
    from align.stages.rollout import Sampling, make_engine
    from align.stages.tool_rollout import run_conversations, tool_suffix_ids

    model, tok, _ = load_target(str(tool_policy))
    rows, _ = load_prompts(str(DATA / "tool_prompts.jsonl"))
    prompts = [r["prompt"] for r in rows]
    engine = make_engine("hf", tok, Sampling(max_new_tokens=128, temperature=0.0))
    out = run_conversations(engine, model, prompts, ToolSet.resolve(["calculator"], None), max_tool_calls=2,
                            max_completion_length=128)
    assert out.stats.calls >= 3 and out.stats.timeouts == 0
    for ids, mask, conversation in zip(out.completion_ids, out.model_mask, out.conversation, strict=True):
        assert len(ids) == len(mask) and mask[0] == 1 and mask[-1] == 1  # starts and ends with the model's tokens
        tool_turns = [i for i, m in enumerate(conversation) if m["role"] == "tool"]
        masked = [t for t, m in zip(ids, mask, strict=True) if m == 0]
        expected = []
        for i in tool_turns:
            call = json.loads(conversation[i - 1]["content"].split("<tool_call>")[1].split("</tool_call>")[0])
            assert conversation[i]["content"] == calculator(**call["arguments"])  # the tool ran on the model's call
            assert conversation[i + 1]["role"] == "assistant"  # ... and the model went on after reading the result
            expected += tool_suffix_ids(tok, [conversation[i]])
        assert masked == expected  # exactly the rendered tool results are 0
        model_text = tok.decode([t for t, m in zip(ids, mask, strict=True) if m == 1], skip_special_tokens=True)
        assert model_text == "".join(m["content"] for m in conversation if m["role"] == "assistant")
    rolled = [r for r in out.conversation if any(m["role"] == "tool" for m in r)]
    assert rolled and all(r[-1]["role"] == "assistant" for r in rolled)


def test_grpo_hands_trl_a_mask_that_is_zero_exactly_on_the_tool_results(tool_policy, tmp_path):
    """What TRL's GRPOTrainer trains on: `tool_mask` (from the rollout's env_mask) is 0 on the rendered tool results and
    1 on every token the model sampled; the loss mask is completion_mask × tool_mask."""
    from align.stages.common import start_stage
    from align.stages.grpo import GRPOConfig, build_trainer, load_prompt_data

    cfg = GRPOConfig.from_kwargs(from_run=str(tool_policy), data=str(DATA / "tool_prompts.jsonl"), reward=["accuracy"],
                                 tool=["calculator"], output=str(tmp_path / "grpo"), num_generations=4, batch_size=8,
                                 max_completion_length=128, beta=0.0, backend="hf", tensorboard=False)
    started = start_stage(cfg, "grpo", load_prompt_data)
    trainer = build_trainer(cfg, started, callbacks=[])
    trainer.model.train()
    out = trainer._generate_and_score_completions([row for row in started.train[:2] for _ in range(4)])
    tok = trainer.processing_class
    result = r"\n<\|im_start\|>user\n<tool_response>\n[^<]*\n</tool_response><\|im_end\|>\n<\|im_start\|>assistant\n"
    called = 0
    for ids, real, tool in zip(out["completion_ids"], out["completion_mask"], out["tool_mask"], strict=True):
        ids, tool = ids[real.bool()].tolist(), tool[real.bool()].tolist()
        masked = tok.decode([t for t, m in zip(ids, tool, strict=True) if m == 0])
        assert re.fullmatch(f"({result})*", masked), masked  # nothing but rendered tool results is masked
        turns = tok.decode([t for t, m in zip(ids, tool, strict=True) if m == 1])
        assert "<tool_response>" not in turns  # ... and every rendered tool result is
        called += bool(masked)
    assert called > 0


def test_grpo_with_the_calculator_logs_tool_metrics(cli, tool_policy, tmp_path):
    out = tmp_path / "grpo"
    code, _, err = cli("grpo", "--from", tool_policy, "--data", DATA / "tool_prompts.jsonl", "--reward", "accuracy",
                       "--reward", "closeness(scale=1000000)", "--tool", "calculator", "--max-tool-calls", "2",
                       "--num-generations", "4", "--batch-size", "8", "--max-completion-length", "128", "--max-steps", "2", "--logging-steps", "1", "--beta", "0",
                       "--backend", "hf", "--no-tensorboard", "--output", out)
    assert code == 0, err
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2]
    # sampled at temperature 1, some calls are malformed (an unknown tool name, bad JSON): counted as errors
    assert all(m["tools/calls"] > 0 and 0 <= m["tools/errors"] <= m["tools/calls"] and m["tools/timeouts"] == 0
               for m in steps)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["tools"] == {"tool": ["calculator"], "environment": None, "max_tool_calls": 2, "tool_timeout": 10.0}


def test_eval_samples_the_same_multi_turn_rollouts(cli, tool_policy, tmp_path):
    out = tmp_path / "eval.json"
    code, _, err = cli("eval", tool_policy, "--data", DATA / "tool_prompts.jsonl", "--tool", "calculator",
                       "--max-new-tokens", "128", "--backend", "hf", "--output", out)
    assert code == 0, err
    metrics = json.loads(out.read_text())
    assert metrics["tools/calls"] >= 0.5 and metrics["tools/timeouts"] == 0  # per completion (greedy: one each)
    assert metrics["kl"] > 0  # to the base model, over the model's own tokens
    from align.rewards.tools import calculator

    called = [e["completion"] for e in metrics["examples"] if "<tool_response>" in e["completion"]]
    assert called
    for text in called:  # the completion the rewards read: the call, the calculator's result, the model's answer
        call = json.loads(text.split("<tool_call>")[1].split("</tool_call>")[0])
        assert f"<tool_response>\n{calculator(**call['arguments'])}\n</tool_response>" in text
    code, _, err = cli("eval", tool_policy, "--data", "arith-prefs-eval", "--tool", "calculator")
    assert code == 2 and "holds preference pairs, which are scored, not sampled: --tool / --environment" in err


def test_rewards_check_scores_multi_turn_rollouts(cli, tool_policy):
    code, out, err = cli("rewards", "check", "accuracy", "--data", DATA / "tool_prompts.jsonl", "--from", tool_policy,
                         "--tool", "calculator", "--max-new-tokens", "128", "--num-samples", "4")
    assert code == 0, err
    assert "multi-turn with tools: " in out and " 0 timeouts" in out and "<tool_call>" in out
    # rewards receive each rollout's conversation and environment, as in grpo
    code, out, err = cli("rewards", "check", _spec("env_calls"), "--data", DATA / "tool_prompts.jsonl", "--from",
                         tool_policy, "--environment", _spec("CountingCalculator"), "--max-new-tokens", "128",
                         "--num-samples", "4", "--temperature", "0")
    assert code == 0, err
    calls, errors = map(int, re.search(r"multi-turn with tools: (\d+) tool calls, (\d+) errors", out).groups())
    mean = float(re.search(r"env_calls \(.*?\), weight 1: mean ([\d.]+)", out).group(1))
    assert calls > errors and mean == pytest.approx((calls - errors) / 4)  # each environment saw its rollout's calls
    code, _, err = cli("rewards", "check", "accuracy", "--data", DATA / "tool_prompts.jsonl", "--tool", "calculator")
    assert code == 2 and "--tool / --environment make the completions multi-turn rollouts, which need --from RUN" in err


@pytest.mark.slow  # a vLLM engine start (the single-turn hf = vllm check is tests/test_vllm.py's)
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_hf_and_vllm_give_the_same_conversation_greedily(tool_policy, tmp_path):
    """Both rollout backends run the same loop: greedy rollouts with the calculator, one per backend (vLLM serving
    the fine-tuned weights as a model directory), give the same conversations and tool counts."""
    results = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"{backend}.json"
        proc = subprocess.run(  # a separate process: vLLM's engine process needs a guarded __main__
            [sys.executable, "-m", "align", "eval", str(Path(tool_policy) / "model"), "--data",
             str(DATA / "tool_prompts.jsonl"), "--tool", "calculator", "--max-new-tokens", "128", "--backend", backend,
             "--vllm-memory", "0.2", "--output", str(out)], capture_output=True, text=True, timeout=HANG_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[backend] = json.loads(out.read_text())
    hf, vllm = results["hf"], results["vllm"]
    assert hf["tools/calls"] > 0 and hf["tools/calls"] == vllm["tools/calls"]
    assert [e["completion"] for e in hf["examples"]] == [e["completion"] for e in vllm["examples"]]


@pytest.mark.slow  # a learning check: full sft on 3000 traces
def test_the_calculator_makes_the_difference_after_a_short_sft(cli, tmp_path):
    """The tools demo (recipes/tools.yaml) in CI size: full sft of a random tiny model on 3000 calculator traces of
    the demo's task ("What is 4898 * 85?", 6-digit products) for 420 steps of 2 packed rows, then greedy held-out
    eval on 50 other problems. With the calculator the model copies the numbers into its call and the result into its
    answer; offered no tools, the same model still writes a call that nobody answers (it never learnt to multiply)."""
    import align
    from align.data.samples import multiplication_records, write_jsonl
    from align.tiny import build_tiny_model

    traces, _, _, held_out = multiplication_records(n_sft=3000, n_rl=0, n_eval=50, seed=11)
    write_jsonl(tmp_path / "traces.jsonl", traces)
    write_jsonl(tmp_path / "held_out.jsonl", held_out)
    base = build_tiny_model(tmp_path / "base", split_digits=True, num_heads=8, initializer_range=0.02, seed=1)
    run = align.sft(model=str(base), data=str(tmp_path / "traces.jsonl"), adapter="full", lr=3e-3,
                    lr_scheduler="constant_with_warmup", warmup=0.05, weight_decay=0.1, batch_size=2, max_length=1024,
                    max_steps=420, logging_steps=60, output=tmp_path / "sft", tensorboard=False)
    metrics = {}
    for name, flags in (("with", ["--tool", "calculator", "--max-new-tokens", "128"]), ("without", ["--max-new-tokens", "8"])):
        code, _, err = cli("eval", run, "--data", tmp_path / "held_out.jsonl", "--backend", "hf", "--batch-size", "50",
                           *flags, "--output", tmp_path / f"{name}.json")
        assert code == 0, err
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())
    accuracy = {name: m["accuracy"] for name, m in metrics.items()}
    assert metrics["with"]["tools/calls"] == 1.0 and metrics["with"]["tools/errors"] == 0
    assert accuracy["with"] >= 0.5 and accuracy["without"] == 0.0, (accuracy, metrics["with"]["examples"])


# -- align pairs with tools ---------------------------------------------------------------------------------------
PAIRS_REWARDS = ("--reward", "accuracy", "--reward", "closeness(scale=1000000)")


def _sample_pairs(cli, policy, out, *flags):
    code, _, err = cli("pairs", "--from", policy, "--data", DATA / "tool_prompts.jsonl", *PAIRS_REWARDS, "--tool",
                       "calculator", "--max-tool-calls", "2", "--num-generations", "8", "--max-completion-length", "128",
                       "--backend", "hf", "--seed", "1", *flags, "--output", out)
    assert code == 0, err
    return [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tool_pairs(tool_policy, tmp_path_factory) -> Path:
    """`align pairs --tool calculator` on the calculator-tuned model (temperature 1, 8 rollouts per prompt)."""
    from align.cli import main

    out = tmp_path_factory.mktemp("pairs") / "pairs"
    code = main(["pairs", "--from", str(tool_policy), "--data", str(DATA / "tool_prompts.jsonl"), *PAIRS_REWARDS,
                 "--tool", "calculator", "--max-tool-calls", "2", "--num-generations", "8", "--max-completion-length",
                 "128", "--backend", "hf", "--seed", "1", "--output", str(out)])
    assert code == 0
    return out


def _score(row: dict, side: str) -> float:
    """The pairs run's rewards (accuracy + closeness), recomputed on a written conversation: both read the model's
    last turn of the conversation, never a tool's result."""
    from align.rewards.builtin import accuracy, closeness

    columns = {"answer": [row["answer"]], "conversation": [row[side]]}
    return sum(fn(["q"], [""], **columns)[0] for fn in (accuracy(), closeness(scale=1000000)))


def _check_tool_turns(conversation: list[dict]) -> int:
    """Every tool message is the calculator's output for its call in the assistant turn before it (a structured
    `tool_calls` entry, or a call left in the text when it does not parse or render as one); returns how many."""
    from itertools import takewhile

    from align.rewards.tools import calculator, parse_tool_calls

    count = 0
    for i, message in enumerate(conversation):
        results = list(takewhile(lambda m: m["role"] == "tool", conversation[i + 1 :]))
        if message["role"] != "assistant" or not results:
            continue
        calls = [c["function"] for c in message["tool_calls"]] if message.get("tool_calls") else \
            parse_tool_calls(message["content"])
        assert len(calls) == len(results)
        for call, result in zip(calls, results, strict=True):
            try:
                expected = calculator(**call["arguments"]) if isinstance(call, dict) and call["name"] == "calculator" \
                    else None
            except TypeError:  # arguments the calculator does not take: the model reads an error
                expected = None
            assert (result["content"] == expected) if expected is not None else result["content"].startswith("error: ")
        count += len(results)
    assert conversation[-1]["role"] == "assistant"  # every rollout ends with the model's turn
    return count


def test_pairs_with_the_calculator_write_the_conversations_and_their_rescored_margins(tool_pairs):
    from align.rewards.tools import ToolSet

    rows = [json.loads(line) for line in (tool_pairs / "pairs.jsonl").read_text().splitlines()]
    assert rows
    schemas = ToolSet.resolve(["calculator"], None).schemas()
    called = 0
    for row in rows:
        assert row["tools"] == schemas  # the chat template renders the system turn the rollouts saw
        assert row["margin"] == pytest.approx(_score(row, "chosen") - _score(row, "rejected"), abs=1e-9)
        assert row["margin"] > 0 and row["chosen"] != row["rejected"]
        called += _check_tool_turns(row["chosen"]) + _check_tool_turns(row["rejected"])
    full = [r["chosen"] for r in rows if [m["role"] for m in r["chosen"]] == ["assistant", "tool", "assistant"]
            and r["chosen"][0].get("tool_calls")]
    assert full and called >= len(full)  # the call (as structured tool_calls), the calculator's result, the answer
    manifest = json.loads((tool_pairs / "run.json").read_text())
    assert manifest["tools"]["tool"] == ["calculator"] and manifest["metrics"]["tools/calls"] > 0
    assert manifest["metrics"]["tools/timeouts"] == 0


def test_dpo_on_tool_pairs_starts_at_ln2_and_counts_only_the_model_tokens(cli, tool_policy, tool_pairs, tmp_path):
    """The seam pairs -> dpo: DPO from the policy that sampled the pairs starts at ln 2 (policy = reference), and its
    log-probs leave out the rendered tool results (which the model never chose)."""
    import math

    from align.generate import load_target
    from align.stages.dpo import model_token_masks

    out = tmp_path / "dpo"
    code, _, err = cli("dpo", "--from", tool_policy, "--data", tool_pairs / "pairs.jsonl", "--max-steps", "2",
                       "--batch-size", "2", "--logging-steps", "1", "--no-tensorboard", "--output", out)
    assert code == 0, err
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5), first
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # the mask, token by token, on a pair with a tool result (tokenized as TRL's DPOTrainer does)
    _, tok, _ = load_target(str(tool_policy))
    row = next(r for r in map(json.loads, (tool_pairs / "pairs.jsonl").read_text().splitlines())
               if [m["role"] for m in r["chosen"]] == ["assistant", "tool", "assistant"] and r["chosen"][0].get("tool_calls"))

    def ids(messages, **kw):
        return tok(tok.apply_chat_template(messages, tools=row["tools"], tokenize=False, **kw),
                   add_special_tokens=False)["input_ids"]

    prompt = ids(row["prompt"], add_generation_prompt=True)
    example = {**row, "tools": json.dumps(row["tools"]), "prompt_ids": prompt,
               **{f"{s}_ids": ids(row["prompt"] + row[s])[len(prompt):] for s in ("chosen", "rejected")}}
    mask, chosen = model_token_masks(example, tok)["chosen_model_mask"], example["chosen_ids"]
    result = row["chosen"][1]["content"]
    assert tok.decode([t for t, m in zip(chosen, mask, strict=True) if m == 0]) == \
        f"<|im_start|>user\n<tool_response>\n{result}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    kept = tok.decode([t for t, m in zip(chosen, mask, strict=True) if m == 1])
    assert "<tool_call>" in kept and kept.endswith(f"</tool_call><|im_end|>\n{row['chosen'][2]['content']}<|im_end|>\n")


def test_pairs_unpaired_with_tools_label_each_conversation_by_its_rescored_reward(cli, tool_policy, tool_pairs, tmp_path):
    rows = _sample_pairs(cli, tool_policy, tmp_path / "kto-data", "--unpaired")
    assert len(rows) >= 4 and {r["label"] for r in rows} == {True, False}
    for row in rows:
        assert row["score"] == pytest.approx(_score(row, "completion"), abs=1e-9)
        assert row["label"] == (row["score"] >= 0.5)
        _check_tool_turns(row["completion"])
    assert any(_check_tool_turns(r["completion"]) for r in rows)
    # both files are read as the stages that take them read them, tools column included
    code, out, err = cli("data", "inspect", tmp_path / "kto-data" / "pairs.jsonl", "--model", tool_policy)
    assert code == 0 and "kto (as unpaired feedback)" in out, err
    code, out, err = cli("data", "inspect", tool_pairs / "pairs.jsonl", "--num-examples", "10")
    assert code == 0 and "dpo, orpo, simpo, rm" in out and '"tool_calls"' in out, err
    code, _, err = cli("orpo", "--from", tool_policy, "--data", tool_pairs / "pairs.jsonl", "--output", tmp_path / "o")
    assert code == 2 and "these pairs carry a `tools` column (tool-calling conversations), which TRL's ORPO/CPO " \
        "trainers do not render; train on them with align dpo (or kto, rm)." in err
    assert not (tmp_path / "o").exists()


def test_pairs_refuses_bad_tools_before_sampling(cli, tmp_path):
    from align.tiny import build_tiny_model

    common = ("--data", DATA / "tool_prompts.jsonl", "--reward", "accuracy")
    code, _, err = cli("pairs", "--model", tmp_path / "no-model", *common, "--tool", "calculater", "--output",
                       tmp_path / "out")
    assert code == 2 and "Tool spec: Unknown tool 'calculater'. Did you mean 'calculator'? Available: calculator." in err
    code, _, err = cli("pairs", "--model", tmp_path / "no-model", *common, "--max-tool-calls", "3", "--output",
                       tmp_path / "out")
    assert code == 2 and "--max-tool-calls 3 applies to multi-turn rollouts with tools; add --tool SPEC or " \
        "--environment SPEC, or drop --max-tool-calls." in err
    plain = build_tiny_model(tmp_path / "plain")  # its tokenizer without a chat template: align's fallback
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for command in ("pairs", "grpo"):
        code, _, err = cli(command, "--model", plain, *common, "--tool", "calculator", "--output", tmp_path / "out")
        assert code == 2 and f"--tool / --environment: the tokenizer of {plain}: its chat template does not render " \
            "tools (the prompt is the same with and without them)" in err, err
    assert not (tmp_path / "out").exists()


def test_a_pipeline_pairs_stage_takes_tools_like_grpo(cli, tiny_model, tmp_path):
    path = tmp_path / "p.yaml"
    stages = ("stages:\n  - {name: sft, kind: sft, data: " + str(DATA / "tool_traces.jsonl") + ", max_steps: 2}\n"
              "  - {name: pairs, kind: pairs, data: " + str(DATA / "tool_prompts.jsonl") + ", reward: [accuracy], "
              "tool: [TOOL], max_tool_calls: 2}\n  - {name: dpo, kind: dpo, data: pairs}\n")
    path.write_text(f"model: {tiny_model}\noutput: {tmp_path / 'out'}\n" + stages.replace("TOOL", "calculator"))
    code, out, err = cli("run", path, "--dry-run")
    assert code == 0, err
    path.write_text(f"model: {tiny_model}\noutput: {tmp_path / 'out'}\n" + stages.replace("TOOL", "calculater"))
    code, _, err = cli("run", path, "--dry-run")
    assert code == 2 and "Unknown tool 'calculater'. Did you mean 'calculator'?" in err, err


def test_tool_pairs_reach_trl_with_their_tools_and_calls_unchanged_or_are_refused():
    """as_dataset: the `tools` column goes in as JSON (TRL's trainers parse it back per row); rows whose tool calls
    take different argument names would come out of Arrow with each other's names as nulls, so they are refused."""
    from align.errors import AlignError
    from align.stages.common import as_dataset

    def row(name: str, arguments: dict) -> dict:
        call = {"type": "function", "function": {"name": name, "arguments": arguments}}
        chosen = [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "1"},
                  {"role": "assistant", "content": "1"}]
        return {"prompt": [{"role": "user", "content": "q"}], "chosen": chosen,
                "rejected": [{"role": "assistant", "content": "2"}], "tools": [{"type": "function", "function": {
                    "name": name, "parameters": {"type": "object", "properties": {k: {"type": "string"} for k in arguments}}}}]}

    same = [row("calculator", {"expression": "1"}), row("calculator", {"expression": "2 - 1"})]
    dataset = as_dataset(same)
    assert [json.loads(t) for t in dataset["tools"]] == [r["tools"] for r in same]
    assert dataset[1]["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"expression": "2 - 1"}
    with pytest.raises(AlignError, match="Row 1: its tool calls do not pass through a datasets table unchanged"):
        as_dataset([row("calculator", {"expression": "1"}), row("increment", {"by": "1"})])


def test_a_reward_model_reads_tool_pairs_with_their_tools_as_trl_trained_it():
    from align.rewards.reward_model import render
    from align.rewards.tools import ToolSet
    from align.tiny import build_tokenizer

    tok, tools = build_tokenizer(split_digits=True), ToolSet.resolve(["calculator"], None).schemas()
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2 * 3"}}}
    example = {"prompt": [{"role": "user", "content": "What is 2 * 3?"}], "tools": tools,
               "completion": [{"role": "assistant", "content": "", "tool_calls": [call]},
                              {"role": "tool", "name": "calculator", "content": "6"}, {"role": "assistant", "content": "6"}]}
    assert render(tok, example) == tok.apply_chat_template(example["prompt"] + example["completion"], tools=tools,
                                                           tokenize=False)
    assert render(tok, example).startswith("<|im_start|>system\n# Tools\ncalculator(expression: string)")
