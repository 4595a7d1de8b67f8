"""Reading datasets into plain records, with the location of each record for error messages.

Accepted sources (tried in this order):
- a bundled sample name (`arith`, see align.data.samples; a few are generated when loaded, deterministically)
- a local file: .jsonl/.ndjson (one object per line), .json (an array of objects, an object of equal-length
  lists, or an object with one key holding such an array), .csv (header row), .parquet
- a local directory written by `datasets.Dataset.save_to_disk` (or a DatasetDict: see `Split`)
- a hub dataset id (`org/name`, or `org/name:config` for a named configuration), only when online; offline (HF_HUB_OFFLINE=1 or no network) is a clear error
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.data.samples import BUNDLED, GENERATED, bundled_path
from align.errors import AlignError
from align.io import read_text
from align.runs import sha256_path

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


HELD_OUT = ("test", "validation", "eval", "dev")  # what a held-out DatasetDict split is usually called


@dataclass(frozen=True)
class Split:
    """Which split of a DatasetDict directory or hub dataset to read: `name`, or else the first of `defaults` that
    exists. A file or a plain saved Dataset has no splits: naming one there is refused, not ignored. `flag` is the
    option that sets it, for messages."""

    name: str | None = None
    defaults: tuple[str, ...] = ("train",)
    flag: str = "--split"

    def pick(self, available: list[str], source: str) -> str:
        if self.name is not None:
            if self.name not in available:
                raise AlignError(f"{source}: no split '{self.name}'. Available splits: {', '.join(available)}. "
                                 f"Set {self.flag}.")
            return self.name
        found = [s for s in self.defaults if s in available]
        if not found:
            raise AlignError(f"{source} has the splits {', '.join(available)}, none of them {' or '.join(self.defaults)}"
                             f". Choose one with {self.flag} NAME.")
        return found[0]

    def refuse(self, source: str, what: str) -> None:
        """A source without splits: a split named for it would be silently ignored."""
        if self.name is not None:
            raise AlignError(f"{self.flag} {self.name}: {source} is {what} with no splits. Drop {self.flag} (it "
                             "applies to DatasetDict directories and hub datasets).")


@dataclass
class Records:
    """Rows of a dataset as dicts, with where each came from ("file.jsonl:12", "data.parquet row 5")."""

    source: str
    rows: list[dict[str, Any]]
    locations: list[str]
    path: str | None = None
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows[:1000]:
            seen.update(dict.fromkeys(row))
        return list(seen)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "sha256": self.sha256, "rows": len(self.rows), **self.extra}


def looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything with a file suffix, a leading ./ / ~, or deeper is a path."""
    return spec.endswith(FILE_SUFFIXES) or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def load_records(spec: str, split: str | Split | None = None) -> Records:
    """Load the dataset named by `spec` (see module docstring); AlignError on any problem. `split`: a split name
    (or None: train) or a Split."""
    split = split if isinstance(split, Split) else Split(split)
    if spec in GENERATED:
        split.refuse(spec, "a bundled dataset")
        return _generated(spec)
    bundled = bundled_path(spec)
    path = Path(spec).expanduser() if bundled is None else bundled
    if path.exists():
        records = _load_local(path, split)
    elif looks_like_path(spec):
        raise AlignError(f"Dataset not found: {spec} (no such file or directory). Check the path given to --data.")
    else:
        records = _load_hub(spec, split)
    if not records.rows:
        raise AlignError(f"{records.source}: the dataset is empty. Add examples or point --data at another file.")
    return records


def _generated(name: str) -> Records:
    """A bundled dataset generated when loaded; its sha256 is that of its rows as JSON lines (as a file would hold)."""
    import hashlib

    rows = GENERATED[name]()
    digest = hashlib.sha256("".join(json.dumps(r) + "\n" for r in rows).encode()).hexdigest()
    return Records(name, rows, [f"{name} row {i + 1}" for i in range(len(rows))], sha256=digest,
                   extra={"generated": "align.data.samples"})


def _load_local(path: Path, split: Split) -> Records:
    source = str(path)
    if path.is_dir():
        return _load_saved_dataset(path, split)
    split.refuse(source, "a single file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows, locations = _read_jsonl(path)
    elif suffix == ".json":
        rows, locations = _read_json(path)
    elif suffix == ".csv":
        rows, locations = _read_csv(path)
    elif suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pyarrow.ArrowInvalid, OSError) as e:
            raise AlignError(f"{source}: not a readable parquet file ({str(e).splitlines()[0][:200]}). Check the "
                             "file, or give .jsonl/.csv data.") from None
        locations = [f"{source} row {i + 1}" for i in range(len(rows))]
    else:
        raise AlignError(f"{source}: unsupported file type '{suffix}'. Use .jsonl, .json, .csv, .parquet or a "
                         "directory saved with datasets' save_to_disk.")
    return Records(source, rows, locations, path=str(path.resolve()), sha256=sha256_path(path))


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, locations = [], []
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AlignError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}). "
                             "Each line of a .jsonl file must be one complete JSON object.") from None
        if not isinstance(row, dict):
            raise AlignError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}.")
        rows.append(row)
        locations.append(f"{path}:{lineno}")
    return rows, locations


def _read_json(path: Path) -> tuple[list[dict], list[str]]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise AlignError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}).") from None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(data) == 1 and lists and all(isinstance(r, dict) for r in next(iter(lists.values()))):
            data = next(iter(lists.values()))  # {"data": [{...}, ...]}
        elif lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))
            data = [{k: v[i] for k, v in lists.items()} for i in range(n)]  # object of equal-length lists
        else:
            raise AlignError(f"{path}: a JSON object must map column names to equal-length lists "
                             "(or hold one array of records). Got keys: " + ", ".join(map(str, data)))
    if not isinstance(data, list):
        raise AlignError(f"{path}: expected a JSON array of objects, got {type(data).__name__}.")
    bad = [i for i, row in enumerate(data) if not isinstance(row, dict)]
    if bad:
        raise AlignError(f"{path}: record {bad[0] + 1} is a {type(data[bad[0]]).__name__}, not an object. "
                         "Every record must be a JSON object.")
    return data, [f"{path} record {i + 1}" for i in range(len(data))]


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    rows, locations = [], []
    with io.StringIO(read_text(path), newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            if None in row:
                raise AlignError(f"{path}:{reader.line_num}: more fields than the header has columns.")
            rows.append(row)
            locations.append(f"{path}:{reader.line_num}")
    return rows, locations


def _load_saved_dataset(path: Path, split: Split) -> Records:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise AlignError(f"{path}: a directory, but not one saved with datasets' save_to_disk "
                         "(no dataset_info.json/state.json). Point --data at a data file instead.") from None
    extra = {}
    if isinstance(data, datasets.DatasetDict):
        extra["split"] = split.pick(list(data), str(path))
        data = data[extra["split"]]
    else:
        split.refuse(str(path), "a saved Dataset")
    rows = data.to_list()
    return Records(str(path), rows, [f"{path} row {i + 1}" for i in range(len(rows))],
                   path=str(path.resolve()), sha256=sha256_path(path), extra=extra)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: hub datasets cannot be loaded (or checked) now."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def near_bundled(spec: str) -> str | None:
    """The bundled sample `spec` is a typo of (`reveiws` -> `reviews`), if any; a hub id (`org/name`) is none."""
    near = difflib.get_close_matches(spec, [*BUNDLED, *GENERATED], n=1, cutoff=0.8)
    return near[0] if near and "/" not in spec else None


def _load_hub(spec: str, split: Split) -> Records:
    hint = f"Bundled samples: {', '.join([*BUNDLED, *GENERATED])}."
    if near := near_bundled(spec):  # say so before any download (or the offline refusal)
        raise AlignError(f"Dataset '{spec}' is not a local file or directory, nor a bundled sample. Did you mean "
                         f"'{near}'? {hint}")
    if hub_offline():
        raise AlignError(f"Dataset '{spec}' is not a local file or directory, and the hub is offline "
                         f"(HF_HUB_OFFLINE is set). Pass a local file. {hint}")
    import datasets

    name, _, config = spec.partition(":")  # `org/name:config`, e.g. openai/gsm8k:main
    chosen = split.name or split.defaults[0]
    try:
        data = datasets.load_dataset(name, config or None, split=chosen)
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AlignError(f"Dataset '{spec}' is not a local file or directory and could not be loaded from the hub "
                         f"({first}). Pass a local file. {hint}") from None
    rows = data.to_list()
    return Records(spec, rows, [f"{spec}[{chosen}] row {i + 1}" for i in range(len(rows))],
                   sha256=getattr(data, "_fingerprint", None), extra={"split": chosen})
