"""Dataset loading (align.data.loading), format detection and normalisation (align.data.formats), chat
rendering and loss masks (align.data.chat), `align data inspect` (align.data.inspect), and bundled samples."""

from __future__ import annotations

import random

from align.data.formats import normalize
from align.data.loading import Records, load_records


def load_examples(spec: str, *, split=None, fmt: str = "auto", columns=(), system_prompt=None):
    """(normalised examples, detected format, Records) for a dataset spec."""
    records = load_records(spec, split)
    examples, fmt = normalize(records, fmt, columns, system_prompt)
    records.extra["format"] = fmt
    return examples, fmt, records


def holdout(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Split off a seeded random `fraction` of `examples` (at least one) as a held-out set."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = max(1, round(len(examples) * fraction))
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


__all__ = ["Records", "holdout", "load_examples", "load_records", "normalize"]
