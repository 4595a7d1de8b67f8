"""Prompt datasets for online RL (grpo, ppo): every record becomes {"prompt": [messages], **other columns}.

Accepted: a `prompt` column (a string, made a user message, or a list of messages ending with a user turn);
`messages` conversations (everything before the last assistant turn is the prompt); `question` (QA data).
The other columns (e.g. `answer`) are kept and passed to the reward functions. `--columns prompt=query`
renames, `--system-prompt` adds a system message.
"""

from __future__ import annotations

from typing import Any

from align.data.formats import RecordError, _messages, _turn, convert_rows, parse_column_map
from align.data.loading import Records, load_records
from align.errors import AlignError


def _prompt_of(row: dict[str, Any]) -> tuple[list[dict], set[str]]:
    if row.get("prompt") is not None:
        return _turn(row["prompt"], "prompt", "user"), {"prompt", "completion"}
    if row.get("messages") is not None:
        messages = _messages(row["messages"], "messages")
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise RecordError("'messages' has no turn before the assistant reply to use as the prompt")
        return messages, {"messages"}
    if row.get("question") is not None:
        return _turn(row["question"], "question", "user"), {"question"}
    raise RecordError("no 'prompt', 'messages' or 'question' field")


def normalize_prompts(records: Records, columns=(), system_prompt: str | None = None) -> list[dict[str, Any]]:
    mapping = parse_column_map(list(columns))
    found = records.columns()
    if not {"prompt", "messages", "question"} & {mapping.get(c, c) for c in found}:
        raise AlignError(f"{records.source}: no prompts found. Columns: {', '.join(found) or '(none)'}. Expected a "
                         "'prompt' column (or 'messages' / 'question'); rename with --columns prompt=COLUMN.")

    def prompt_row(row: dict) -> dict:
        prompt, used = _prompt_of(row)
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        return {"prompt": prompt, **{k: v for k, v in row.items() if k not in used}}

    return convert_rows(records, mapping, prompt_row, "prompt record(s)")


def load_prompts(spec: str, *, split=None, columns=(), system_prompt=None) -> tuple[list[dict], Records]:
    records = load_records(spec, split)
    return normalize_prompts(records, columns, system_prompt), records
