"""Unpaired feedback for `align kto`: one completion per row with a thumbs up or down, normalised to TRL's
conversational unpaired-preference form:

    {"prompt": [messages...], "completion": [assistant message], "label": true | false}

Accepted inputs:
- unpaired (TRL's KTO format): `prompt`, `completion`, `label` — prompt and completion each a string or a list of
  role/content messages (a string prompt becomes a user message, a string completion an assistant message); `label`
  a boolean (true = desirable); in a CSV file, where every value is text, the words true / false
- paired (prompt/chosen/rejected or implicit-prompt chosen/rejected, as `align dpo` reads them,
  align.data.preference): each pair becomes two rows, chosen -> label true, rejected -> label false
An optional `tools` column (JSON function schemas) travels with each row: completions may be tool-calling
conversations (what `align pairs --unpaired --tool` writes).
Column renames (`--columns label=thumbs_up completion=response`) and `--system-prompt` work as for the other readers.
Raises AlignError naming file:line and field for a missing or non-boolean label, a missing prompt or completion,
and for data where every label is the same (nothing to contrast; say which).
"""

from __future__ import annotations

from typing import Any

from align.data.formats import RecordError, _turn, convert_rows, parse_column_map, with_tools
from align.data.loading import Records, load_records
from align.errors import AlignError

UNPAIRED_COLUMNS = ("prompt", "completion", "label")


def is_unpaired(columns: list[str]) -> bool:
    """Whether (renamed) columns look like unpaired feedback rather than pairs."""
    return "label" in columns and "completion" in columns


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RecordError(f"field 'label' must be true or false (a boolean: true = desirable), got {value!r:.40}")


def normalize_feedback(row: dict[str, Any], system_prompt: str | None = None) -> dict[str, Any]:
    """One unpaired row in TRL's conversational form; RecordError names the field at fault."""
    for key in UNPAIRED_COLUMNS:
        if row.get(key) is None:
            raise RecordError(f"missing field '{key}'" + (" (true = desirable, false = undesirable)" if key == "label" else ""))
    prompt = _turn(row["prompt"], "prompt", "user")
    completion = _turn(row["completion"], "completion", "assistant")
    if completion[-1]["role"] != "assistant":
        raise RecordError("'completion' must end with an assistant message")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return with_tools({"prompt": prompt, "completion": completion, "label": _label(row["label"])}, row)


def unpair(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference pairs (align.data.preference's form) as unpaired rows: chosen -> true, rejected -> false, in order."""
    return [with_tools({"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}, p)
            for p in pairs for key in ("chosen", "rejected")]


def normalize_unpaired(records: Records, columns=(), system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Every record as unpaired feedback (paired records split in two); one AlignError listing the bad records."""
    mapping = parse_column_map(list(columns))
    found = records.columns()
    renamed = [mapping.get(c, c) for c in found]
    if not is_unpaired(renamed):
        if {"chosen", "rejected"} <= set(renamed):
            from align.data.preference import normalize_preferences

            records.extra["unpaired_from"] = "pairs"  # chosen -> label true, rejected -> label false
            return unpair(normalize_preferences(records, columns, system_prompt))
        raise AlignError(
            f"{records.source}: not unpaired feedback. Columns found: {', '.join(found) or '(none)'}. Expected "
            "prompt/completion/label (label true = desirable, false = undesirable), or preference pairs "
            "(prompt/chosen/rejected), which are split into one desirable and one undesirable row. Rename columns "
            "with --columns label=COLUMN completion=COLUMN."
        )
    return convert_rows(records, mapping, lambda row: normalize_feedback(row, system_prompt), "unpaired record(s)")


def check_both_labels(rows: list[dict[str, Any]], source: str) -> None:
    """KTO contrasts desirable with undesirable completions: data with one label only teaches nothing useful."""
    labels = {r["label"] for r in rows}
    if rows and len(labels) == 1:
        which = "true (desirable)" if labels == {True} else "false (undesirable)"
        raise AlignError(f"{source}: every one of the {len(rows)} rows has label {which}. KTO needs both desirable "
                         "and undesirable completions; add the other kind (or train on the good ones with align sft).")


def load_unpaired(spec: str, *, split=None, columns=(), system_prompt=None) -> tuple[list[dict], Records]:
    records = load_records(spec, split)
    rows = normalize_unpaired(records, columns, system_prompt)
    check_both_labels(rows, records.source)
    return rows, records
