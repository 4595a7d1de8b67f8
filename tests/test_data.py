"""Format detection and normalisation for every accepted format and source type; data errors."""

from __future__ import annotations

import json

import pytest

from align.data import load_examples
from align.errors import AlignError


@pytest.mark.parametrize(
    "name, fmt, first",
    [
        ("messages.jsonl", "messages", [("system", "You are terse."), ("user", "What is 2 + 2?"), ("assistant", "4")]),
        ("sharegpt.json", "sharegpt", [("user", "What is 3 + 4?"), ("assistant", "7")]),
        ("alpaca.json", "alpaca", [("user", "Add the numbers.\n\n5 and 6"), ("assistant", "11")]),
        ("security_qa.json", "qa", [("user", "What is a firewall?"),
                                    ("assistant", "A system that filters network traffic by rules.")]),
        ("prompt_completion.jsonl", "prompt_completion", [("user", "What is 1 + 1?"), ("assistant", "2")]),
        ("prompt_completion_messages.jsonl", "prompt_completion", [("user", "What is 1 + 1?"), ("assistant", "2")]),
        ("object_of_lists.json", "qa", [("user", "What is 1 + 2?"), ("assistant", "3")]),
    ],
)
def test_conversational_formats_are_detected_and_normalised(data_dir, name, fmt, first):
    examples, detected, _ = load_examples(str(data_dir / name))
    assert detected == fmt
    assert [(m["role"], m["content"]) for m in examples[0]["messages"]] == first


def test_alpaca_without_input_and_sharegpt_system(data_dir):
    alpaca, _, _ = load_examples(str(data_dir / "alpaca.json"))
    assert alpaca[1]["messages"][0] == {"role": "user", "content": "Name a colour."}
    sharegpt, _, _ = load_examples(str(data_dir / "sharegpt.json"))
    assert sharegpt[1]["messages"][0] == {"role": "system", "content": "Be kind."}


def test_plain_text_stays_text(data_dir):
    examples, fmt, _ = load_examples(str(data_dir / "text.jsonl"))
    assert fmt == "text" and examples[0] == {"text": "The quick brown fox jumps over the lazy dog."}


def test_column_mapping_and_system_prompt_on_csv(data_dir):
    examples, fmt, records = load_examples(str(data_dir / "renamed.csv"), columns=["prompt=query", "completion=response"],
                                           system_prompt="Answer with a number.")
    assert fmt == "prompt_completion" and records.locations[0].endswith("renamed.csv:2")
    assert [m["role"] for m in examples[0]["messages"]] == ["system", "user", "assistant"]
    assert examples[0]["messages"][2]["content"] == "7"


def test_parquet_and_save_to_disk(tmp_path, data_dir):
    import datasets

    rows = [json.loads(line) for line in (data_dir / "prompt_completion.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    for spec in ("d.parquet", "saved", "dict"):
        examples, fmt, records = load_examples(str(tmp_path / spec))
        assert fmt == "prompt_completion" and len(examples) == 2 and records.sha256
    with pytest.raises(AlignError, match="no split 'validation'. Available splits: train, test"):
        load_examples(str(tmp_path / "dict"), split="validation")


def test_splits_are_chosen_recorded_or_refused_never_ignored(tmp_path, cli, tiny_model, data_dir):
    """--data reads `train` of a DatasetDict, --eval-data its held-out split (not --split); a split named for a
    file or a plain saved Dataset is refused; run.json records the split each one read."""
    import datasets

    from align.data.loading import HELD_OUT, Split

    def rows(tag):
        return [{"prompt": f"{tag} {i}?", "completion": str(i)} for i in range(4)]

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("train")),
                          "validation": datasets.Dataset.from_list(rows("validation"))}).save_to_disk(str(tmp_path / "dict"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("train"))}).save_to_disk(str(tmp_path / "only"))
    datasets.Dataset.from_list(rows("plain")).save_to_disk(str(tmp_path / "plain"))
    held_out = Split(None, HELD_OUT, "--eval-data-split")
    _, _, records = load_examples(str(tmp_path / "dict"), split=held_out)
    assert records.rows[0]["prompt"] == "validation 0?" and records.describe()["split"] == "validation"
    with pytest.raises(AlignError, match="has the splits train, none of them test or validation or eval or dev. "
                                         "Choose one with --eval-data-split NAME"):
        load_examples(str(tmp_path / "only"), split=held_out)
    with pytest.raises(AlignError, match="--split test: .*plain is a saved Dataset with no splits. Drop --split"):
        load_examples(str(tmp_path / "plain"), split="test")
    with pytest.raises(AlignError, match="--split test: .*prompt_completion.jsonl is a single file with no splits"):
        load_examples(str(data_dir / "prompt_completion.jsonl"), split="test")

    code, _, err = cli("sft", "--model", tiny_model, "--data", tmp_path / "dict", "--eval-data", tmp_path / "dict",
                       "--output", tmp_path / "run", "--max-steps", "1", "--no-tensorboard")
    assert code == 0, err
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["datasets"]["train"]["split"] == "train" and manifest["datasets"]["eval"]["split"] == "validation"


def test_bundled_sample_is_valid():
    examples, fmt, _ = load_examples("arith")
    assert fmt == "messages" and len(examples) == 2000
    assert examples[0]["messages"][1]["role"] == "assistant"


def test_forced_format_and_unknown_format_name(data_dir):
    with pytest.raises(AlignError, match="missing field"):
        load_examples(str(data_dir / "messages.jsonl"), fmt="qa")


@pytest.mark.parametrize(
    "name, message",
    [
        ("malformed.jsonl", r"malformed.jsonl:3: malformed JSON"),
        ("unknown_format.jsonl", r"cannot detect the dataset format. Columns found: foo, bar. Accepted formats: messages"),
        ("empty.jsonl", r"empty.jsonl: the dataset is empty"),
        ("missing.jsonl", r"Dataset not found: .*missing.jsonl"),
    ],
)
def test_data_errors_name_the_file_and_fix(data_dir, name, message):
    with pytest.raises(AlignError, match=message):
        load_examples(str(data_dir / name))


def test_every_bad_record_is_reported_at_once(data_dir):
    with pytest.raises(AlignError) as e:
        load_examples(str(data_dir / "nonstring.jsonl"))
    text = str(e.value)
    assert "2 invalid record(s)" in text
    assert "nonstring.jsonl:2: field 'messages[1].content' must be a string, got int" in text
    assert "nonstring.jsonl:3: messages[0].role is 'robot'; expected one of assistant, system, tool, user" in text


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(AlignError, match="not a local file or directory, and the hub is offline"):
        load_examples("someorg/somedataset")


def test_tool_calling_conversations_train_on_the_calls_never_on_the_results(data_dir, tiny_model, cli, tmp_path):
    """TRL's tool-calling form (a `tools` column, assistant `tool_calls`, `tool` messages; objects or JSON strings) is
    rendered by the chat template; the loss covers the tool call and the final answer, token for token, and no token
    of the tool's result or of the tool schemas."""
    from align.data.chat import encode_example
    from align.models import load_tokenizer

    examples, fmt, _ = load_examples(str(data_dir / "tool_calls.jsonl"))
    assert fmt == "messages" and len(examples) == 12
    assert all(isinstance(ex["tools"], list) and isinstance(ex["messages"][1]["tool_calls"][0]["function"]["arguments"],
                                                            dict) for ex in examples)
    tokenizer = load_tokenizer(tiny_model)
    ex = examples[0]
    encoded = encode_example(ex, tokenizer)
    trained = tokenizer.decode([t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m])
    call, result = ex["messages"][1]["tool_calls"][0]["function"]["arguments"]["expression"], ex["messages"][2]["content"]
    expected = (f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{call}"}}}}\n</tool_call><|im_end|>\n'
                f"{result}<|im_end|>\n")
    assert trained == expected  # the result appears once: in the final answer, not from the tool turn
    code, _, err = cli("sft", "--model", tiny_model, "--data", data_dir / "tool_calls.jsonl", "-o", tmp_path / "run",
                       "--max-steps", "1", "--batch-size", "2", "--max-length", "1024", "--no-tensorboard")
    assert code == 0, err


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": "calc"}]},
     "messages[1].tool_calls' must be a list of tool calls"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                                     "tool_calls": [{"function": {"name": "c", "arguments": "{x"}}]}]},
     "is not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "[1, 2]"},
     "'tools' must be a list of JSON function schemas"),
])
def test_bad_tool_calls_are_named(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(AlignError) as e:
        load_examples(str(path))
    assert message in str(e.value) and "bad.jsonl:1" in str(e.value)
