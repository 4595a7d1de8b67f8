"""Labelled or scored data for a pointwise reward model / classifier (`align rm` on non-paired data).

One row = one text and its target(s):

    text                   {"text": "great film", "label": 1}
    prompt + completion    {"prompt": "Review?", "completion": "great film", "score": 4.5}
                           (strings, or lists of role/content messages, as for SFT's prompt_completion)

Targets (`--label-columns`, default: `label`, else `score`), one model output (head) per column:
- `bce` (binary cross-entropy on the logit): every value 0 or 1 (true/false, "0"/"1" from CSV too). The default
  for a column named `label`, and for other columns whose values are all 0/1.
- `mse` (regression): any finite number. The default for `score` and for other numeric columns.
`--objective` forces one for every column. Normalised form:
{"text": str} or {"prompt": [messages], "completion": [messages]}, plus "labels": [float, ...] (one per column).
"""

from __future__ import annotations

import math
from typing import Any

from align.data.formats import RecordError, _turn, convert_rows, parse_column_map
from align.data.loading import Records, load_records
from align.errors import AlignError

DEFAULT_TARGETS = ("label", "score")
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


def target_columns(columns: list[str], label_columns: list[str]) -> list[str]:
    """The target columns: `--label-columns`, else `label`, else `score` (empty when the data has none)."""
    if label_columns:
        return list(label_columns)
    return [c for c in DEFAULT_TARGETS if c in columns][:1]


def _binary(value: Any, field: str) -> float:
    if isinstance(value, bool) or value in (0, 1):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return float(value.strip().lower() in TRUE)
    raise RecordError(f"field '{field}' must be 0 or 1 (or true/false) for a binary label, got {value!r:.40}. "
                      "Scores are regression targets: --objective mse (or name the column 'score')")


def _number(value: Any, field: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"field '{field}' must be a finite number, got {value!r:.40}")
    return float(value)


def is_binary(value: Any) -> bool:
    try:
        _binary(value, "")
        return True
    except RecordError:
        return False


def objectives_of(records: Records, targets: list[str], objective: str, mapping: dict[str, str]) -> str:
    """`bce` or `mse` for these targets (`objective` auto: see the module docstring)."""
    if objective != "auto":
        return objective
    if targets == ["label"]:
        return "bce"
    if targets == ["score"]:
        return "mse"
    renamed = ({mapping.get(k, k): v for k, v in row.items()} for row in records.rows)
    values = [row.get(c) for row in renamed for c in targets]
    return "bce" if all(v is None or is_binary(v) for v in values) else "mse"


def normalize_pointwise(records: Records, targets: list[str], objective: str, columns=(),
                        system_prompt: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """(examples in the normalised form, the objective used); AlignError listing every bad record."""
    mapping = parse_column_map(list(columns))
    found = [mapping.get(c, c) for c in records.columns()]
    missing = [c for c in targets if c not in found]
    if not targets:  # auto-detected: the data is neither pairs nor labelled rows
        raise AlignError(
            f"{records.source}: neither preference pairs (chosen/rejected) nor labelled rows (a 'label' or 'score' "
            f"column). Columns found: {', '.join(found) or '(none)'}. align rm trains Bradley-Terry on "
            "prompt/chosen/rejected, or a pointwise model on text (or prompt + completion) with a 0/1 'label', a numeric "
            "'score' or the columns named by --label-columns. Rename columns with --columns chosen=COLUMN "
            "rejected=COLUMN or --columns label=COLUMN.")
    if missing:
        raise AlignError(
            f"{records.source}: no column {', '.join(repr(c) for c in missing)} (--label-columns). Columns found: "
            f"{', '.join(found) or '(none)'}. Name existing columns, or rename with --columns {missing[0]}=COLUMN.")
    objective = objectives_of(records, targets, objective, mapping)
    convert = _binary if objective == "bce" else _number
    out = convert_rows(records, mapping, lambda row: {**_text_of(row, system_prompt),
                                                      "labels": [_target(row, c, convert) for c in targets]},
                       "labelled record(s)")
    for i, column in enumerate(targets):
        if len({e["labels"][i] for e in out}) == 1:
            raise AlignError(f"{records.source}: every row has {column} = {out[0]['labels'][i]:g}: there is nothing "
                             f"to learn. Check the column (--label-columns, --columns {column}=...).")
    return out, objective


def _target(row: dict[str, Any], column: str, convert) -> float:
    if row.get(column) is None:
        raise RecordError(f"missing field '{column}'")
    return convert(row[column], column)


def _text_of(row: dict[str, Any], system_prompt: str | None) -> dict[str, Any]:
    if row.get("prompt") is not None and row.get("completion") is not None:
        prompt = _turn(row["prompt"], "prompt", "user")
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        return {"prompt": prompt, "completion": _turn(row["completion"], "completion", "assistant")}
    if isinstance(row.get("text"), str):
        return {"text": row["text"]}
    if row.get("text") is not None:
        raise RecordError(f"field 'text' must be a string, got {type(row['text']).__name__}")
    raise RecordError("needs 'text', or 'prompt' and 'completion' (rename with --columns text=COLUMN)")


def load_pointwise(spec: str, *, split=None, label_columns=(), objective: str = "auto", columns=(),
                   system_prompt=None) -> tuple[list[dict], Records]:
    records = load_records(spec, split)
    targets = target_columns([parse_column_map(list(columns)).get(c, c) for c in records.columns()], list(label_columns))
    examples, objective = normalize_pointwise(records, targets, objective, columns, system_prompt)
    records.extra.update(format="pointwise", objective=objective, heads=targets)
    return examples, records
