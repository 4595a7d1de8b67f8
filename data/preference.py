"""Preference data for `align rm` and `align dpo`, normalised to TRL's conversational preference form:

    {"prompt": [messages...], "chosen": [assistant message], "rejected": [assistant message], "margin"?: float}

Accepted inputs:
- explicit: `prompt`, `chosen`, `rejected` — each a string or a list of role/content messages (a string prompt
  becomes a user message; string answers become assistant messages)
- implicit: `chosen`, `rejected` — two full conversations; their longest common prefix is the prompt
- optional `margin` (a number): how much better chosen is (used by the reward model's margin loss)
- optional `tools` (JSON function schemas, as in sft's messages format): chosen / rejected may then be tool-calling
  conversations (assistant `tool_calls`, `tool` messages, the final answer — what `align pairs --tool` writes); the
  chat template renders the tools in the system turn, as TRL's trainers do
Column renames (`--columns prompt=question chosen=good rejected=bad`) and `--system-prompt` work as for SFT.
"""

from __future__ import annotations

from typing import Any

from align.data.formats import RecordError, _messages, _string, _turn, convert_rows, parse_column_map, with_tools
from align.data.loading import Records, load_records
from align.errors import AlignError


def _conversation(value: Any, field: str, role: str) -> list[dict]:
    return _messages(value, field) if isinstance(value, list) else [{"role": role, "content": _string(value, field)}]


def _split_implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise RecordError("implicit-prompt pairs must share their prompt messages: 'chosen' and 'rejected' start "
                          "differently (give a 'prompt' column instead)")
    return chosen[:n], chosen[n:], rejected[n:]


def normalize_pair(row: dict[str, Any], system_prompt: str | None = None) -> dict[str, Any]:
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise RecordError(f"missing field '{key}'")
    if "prompt" in row and row["prompt"] is not None:
        prompt = _turn(row["prompt"], "prompt", "user")
        chosen = _conversation(row["chosen"], "chosen", "assistant")
        rejected = _conversation(row["rejected"], "rejected", "assistant")
    else:
        if not isinstance(row["chosen"], list) or not isinstance(row["rejected"], list):
            raise RecordError("without a 'prompt' column, 'chosen' and 'rejected' must be full conversations "
                              "(lists of messages)")
        prompt, chosen, rejected = _split_implicit(_messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected"))
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[-1]["role"] != "assistant":
            raise RecordError(f"'{name}' must end with an assistant message")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    out: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if row.get("margin") is not None:
        if isinstance(row["margin"], bool) or not isinstance(row["margin"], (int, float)):
            raise RecordError(f"field 'margin' must be a number, got {row['margin']!r:.40}")
        out["margin"] = float(row["margin"])
    return with_tools(out, row)


def normalize_preferences(records: Records, columns=(), system_prompt: str | None = None) -> list[dict[str, Any]]:
    mapping = parse_column_map(list(columns))
    found = records.columns()
    renamed = {mapping.get(c, c) for c in found}
    if not {"chosen", "rejected"} <= renamed:
        raise AlignError(
            f"{records.source}: not a preference dataset. Columns found: {', '.join(found) or '(none)'}. Expected "
            "prompt/chosen/rejected (explicit) or chosen/rejected conversations (implicit prompt), optional margin. "
            "Rename columns with --columns chosen=COLUMN rejected=COLUMN."
        )
    out = convert_rows(records, mapping, lambda row: normalize_pair(row, system_prompt), "preference record(s)")
    if any("margin" in e for e in out) and not all("margin" in e for e in out):
        raise AlignError(f"{records.source}: 'margin' is set on some records but not all; give it everywhere or nowhere.")
    if out and all(e["chosen"] == e["rejected"] for e in out):
        raise AlignError(f"{records.source}: in every pair 'chosen' equals 'rejected' ({records.locations[0]} for "
                         "one): there is no preference to learn. Check the columns (--columns chosen=... rejected=...) "
                         "or how the pairs were made.")
    return out


def load_preferences(spec: str, *, split=None, columns=(), system_prompt=None) -> tuple[list[dict], Records]:
    records = load_records(spec, split)
    return normalize_preferences(records, columns, system_prompt), records
