"""Detect a dataset's format and normalise it into one internal form.

Internal form: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} for conversational
data, or {"text": str} for plain text (trained on every token, no chat template).

Tool use (TRL's and OpenAI's form, `messages` format): a `tools` column (a list of JSON function schemas, or that
list as a JSON string) travels with the example (`{"messages": ..., "tools": [...]}`) and reaches the chat
template; assistant messages may carry `tool_calls` ([{"type": "function", "function": {"name", "arguments"}}],
arguments an object or a JSON string; content may then be empty or null), and `tool` messages return their results
(optional `name`, `tool_call_id`). The loss covers the assistant turns, tool calls included, never tool results.

    format              columns                                 becomes
    messages            messages: [{role, content}, ...]        as is
    sharegpt            conversations: [{from, value}, ...]     human->user, gpt->assistant, system->system
    alpaca              instruction, output (+ input, system)   user: instruction + "\n\n" + input; assistant: output
    qa                  question, answer                        user: question; assistant: answer
    prompt_completion   prompt, completion (strings or          user: prompt; assistant: completion (message lists
                        message lists)                          are concatenated)
    text                text                                    {"text": ...}

`--columns prompt=q completion=a` renames your columns to the canonical names first; `--format` forces a
format instead of detecting it; `--system-prompt` adds a system message to conversations that have none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from align.data.loading import Records
from align.errors import AlignError, unknown_name

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "bot": "assistant", "system": "system"}
MAX_LISTED = 20


class RecordError(ValueError):
    """A problem with one record; the message names the field."""


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"field '{field}' must be a string, got {type(value).__name__} ({value!r:.40})")
    return value


def _messages(value: Any, field: str, role_key="role", content_key="content", roles=None) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"field '{field}' must be a non-empty list of messages, got {value!r:.60}")
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise RecordError(f"{where} must be an object with '{role_key}' and '{content_key}', got {msg!r:.40}")
        for key in (role_key, content_key):
            if key not in msg:
                raise RecordError(f"{where} has no '{key}' key (keys: {', '.join(map(str, msg))})")
        role = msg[role_key]
        mapped = (roles or {r: r for r in ROLES}).get(role) if isinstance(role, str) else None
        if mapped is None:
            allowed = ", ".join(sorted(roles or ROLES))
            raise RecordError(f"{where}.{role_key} is {role!r}; expected one of {allowed}")
        if mapped == "assistant" and msg.get("tool_calls"):
            content = msg[content_key] if msg[content_key] is not None else ""
            out.append({"role": mapped, "content": _string(content, f"{where}.{content_key}"),
                        "tool_calls": _tool_calls(msg["tool_calls"], f"{where}.tool_calls")})
            continue
        out.append({"role": mapped, "content": _string(msg[content_key], f"{where}.{content_key}"),
                    **{k: _string(msg[k], f"{where}.{k}") for k in ("name", "tool_call_id")
                       if mapped == "tool" and msg.get(k) is not None}})
    return out


def _tool_calls(value: Any, field: str) -> list[dict]:
    """[{"type": "function", "function": {"name": str, "arguments": dict}}] from TRL's / OpenAI's forms."""
    if not isinstance(value, list):
        raise RecordError(f"field '{field}' must be a list of tool calls, got {value!r:.60}")
    out = []
    for i, call in enumerate(value):
        where = f"{field}[{i}]"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                              f"\"arguments\": {{...}}}}}}, got {call!r:.60}")
        arguments = _json_value(function.get("arguments", {}), f"{where}.function.arguments", dict)
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def _json_value(value: Any, field: str, kind: type) -> Any:
    """`value`, or `value` parsed from a JSON string, which must be a `kind`."""
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError(f"field '{field}' is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, kind):
        raise RecordError(f"field '{field}' must be a JSON {kind.__name__}, got {value!r:.60}")
    return value


def _turn(value: Any, field: str, role: str) -> list[dict]:
    return _messages(value, field) if isinstance(value, list) else [{"role": role, "content": _string(value, field)}]


def with_tools(example: dict, row: dict) -> dict:
    """`example` plus the row's `tools` column (JSON function schemas the chat template renders), when it has one."""
    if row.get("tools") is not None:
        tools = _json_value(row["tools"], "tools", list)
        if not all(isinstance(t, dict) for t in tools):
            raise RecordError("field 'tools' must be a list of JSON function schemas (objects)")
        example["tools"] = tools
    return example


def _from_messages(row: dict) -> dict:
    return with_tools({"messages": _messages(row["messages"], "messages")}, row)


def _from_sharegpt(row: dict) -> dict:
    return {"messages": _messages(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)}


def _from_alpaca(row: dict) -> dict:
    user = _string(row["instruction"], "instruction")
    extra = row.get("input")
    if extra not in (None, ""):
        user += "\n\n" + _string(extra, "input")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _string(row["output"], "output")}]
    if row.get("system"):
        messages.insert(0, {"role": "system", "content": _string(row["system"], "system")})
    return {"messages": messages}


def _from_qa(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": _string(row["question"], "question")},
                         {"role": "assistant", "content": _string(row["answer"], "answer")}]}


def _from_prompt_completion(row: dict) -> dict:
    return {"messages": _turn(row["prompt"], "prompt", "user") + _turn(row["completion"], "completion", "assistant")}


def _from_text(row: dict) -> dict:
    return {"text": _string(row["text"], "text")}


# name -> (required columns, converter); detection tries them in this order
FORMATS: dict[str, tuple[tuple[str, ...], Callable[[dict], dict]]] = {
    "messages": (("messages",), _from_messages),
    "sharegpt": (("conversations",), _from_sharegpt),
    "alpaca": (("instruction", "output"), _from_alpaca),
    "qa": (("question", "answer"), _from_qa),
    "prompt_completion": (("prompt", "completion"), _from_prompt_completion),
    "text": (("text",), _from_text),
}
ACCEPTED = ("messages (list of role/content), conversations (ShareGPT from/value), instruction/input/output "
            "(Alpaca), question/answer, prompt/completion (strings or message lists), text")


def parse_column_map(items: list[str]) -> dict[str, str]:
    """["prompt=question", ...] -> {"question": "prompt"} (your column -> canonical name)."""
    mapping = {}
    for item in items:
        canonical, sep, column = item.partition("=")
        if not sep or not canonical or not column:
            raise AlignError(f"--columns: '{item}' must look like NAME=COLUMN, e.g. prompt=question.")
        mapping[column] = canonical
    return mapping


def convert_rows(records: Records, mapping: dict[str, str], convert: Callable[[dict], Any], what: str) -> list:
    """`convert(row)` for every record, its columns renamed by `mapping`; a RecordError on a row is collected, and
    one AlignError lists every bad record as file:line (the first MAX_LISTED, then a count)."""
    out, problems = [], []
    for row, where in zip(records.rows, records.locations, strict=True):
        try:
            out.append(convert({mapping.get(k, k): v for k, v in row.items()}))
        except RecordError as e:
            problems.append(f"{where}: {e}")
    if problems:
        shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else [])
        raise AlignError(f"{records.source}: {len(problems)} invalid {what}:", shown)
    return out


def detect_format(columns: list[str]) -> str | None:
    for name, (required, _) in FORMATS.items():
        if all(c in columns for c in required):
            return name
    return None


def normalize(records: Records, fmt: str = "auto", columns: list[str] = (), system_prompt: str | None = None,
              ) -> tuple[list[dict], str]:
    """Normalise every record; raise one AlignError listing the bad ones (file:line and field)."""
    mapping = parse_column_map(list(columns))
    found = records.columns()
    missing = [c for c in mapping if c not in found]
    if missing:
        raise AlignError(f"{records.source}: --columns names column(s) {', '.join(missing)} that the data does not "
                         f"have. Columns found: {', '.join(found)}.")
    renamed = [m for m in (mapping.get(c, c) for c in found)]
    if fmt == "auto":
        fmt = detect_format(renamed)
        if fmt is None:
            raise AlignError(
                f"{records.source}: cannot detect the dataset format. Columns found: {', '.join(found) or '(none)'}. "
                f"Accepted formats: {ACCEPTED}. Rename columns with --columns NAME=COLUMN (e.g. "
                "--columns prompt=query completion=response) or set --format."
            )
    elif fmt not in FORMATS:
        raise AlignError(unknown_name("format", fmt, FORMATS))
    if fmt == "prompt_completion" and "label" in renamed:
        raise AlignError(f"{records.source}: prompt/completion/label rows are unpaired preference data (TRL's KTO "
                         "format): SFT would train on the label: false completions too. Train on the good rows only "
                         "(filter label: true), or learn from both kinds with align kto (it reads this format).")
    required, convert = FORMATS[fmt]

    def example_of(row: dict) -> dict:
        absent = [c for c in required if c not in row or row[c] is None]
        if absent:
            raise RecordError(f"missing field(s) {', '.join(absent)} required by the {fmt} format")
        example = convert(row)
        if "messages" in example:
            if system_prompt and example["messages"][0]["role"] != "system":
                example["messages"].insert(0, {"role": "system", "content": system_prompt})
            if not any(m["role"] == "assistant" for m in example["messages"]):
                raise RecordError("no assistant message, so nothing to train on")
        return example

    out = convert_rows(records, mapping, example_of, f"record(s) for format '{fmt}'")
    return out, fmt
