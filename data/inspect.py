"""`align data inspect D [--model M]`: the first thing to run on a new dataset.

Prints the detected format, the example count, examples as the model will see them (rendered with the chat
template; the tokens trained on are wrapped in [[ ]]), token-length statistics and how many examples
--max-length would truncate. Without --model, shows the normalised conversation and character lengths.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Literal

from align.config import Config, opt
from align.errors import Problems


@dataclass
class InspectConfig(Config):
    positional = "data"
    data: str | None = opt(None, "Dataset: a file, a save_to_disk directory, a bundled sample name or a hub id.")
    model: str | None = opt(None, "Model or run whose tokenizer and chat template to use (for token statistics).")
    split: str | None = opt(None, "Split of a DatasetDict directory or hub dataset (default: train).")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "qa", "prompt_completion", "text"] = opt(
        "auto", "Dataset format; auto detects it from the columns.")
    columns: list[str] = opt(factory=list, help="Column renames NAME=COLUMN, e.g. --columns prompt=query.")
    system_prompt: str | None = opt(None, "System message added to conversations that have none.")
    max_length: int = opt(1024, "Max length to count truncations against.")
    completion_only_loss: bool = opt(True, "Mark only assistant tokens as trained (as align sft does).")
    num_examples: int = opt(1, "How many examples to show.")

    def check(self, problems: Problems) -> None:
        if not self.data:
            problems.add("Give a dataset: align data inspect DATA [--model MODEL].")


def _tokenizer_for(model: str):
    from pathlib import Path

    from align.errors import AlignError
    from align.models import check_model_path, load_tokenizer

    path = Path(model)
    if (path / "run.json").is_file():  # a run: its saved tokenizer
        path = path / ("model" if (path / "model").is_dir() else "adapter")
    elif problem := check_model_path(model):
        raise AlignError(problem.replace("Pass a model directory", "Pass a model or run directory"))
    return load_tokenizer(str(path))


def _stats(values: list[int]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (f"min {ordered[0]}  mean {statistics.fmean(ordered):.1f}  median {statistics.median(ordered):.0f}  "
            f"p95 {p95}  max {ordered[-1]}")


def inspect(cfg: InspectConfig) -> str:
    from align.data import load_examples

    examples, fmt, records = load_examples(cfg.data, split=cfg.split, fmt=cfg.format, columns=cfg.columns,
                                           system_prompt=cfg.system_prompt)
    lines = [f"dataset:  {records.source}", f"format:   {fmt}", f"examples: {len(examples)}",
             f"columns:  {', '.join(records.columns())}"]
    shown = examples[: cfg.num_examples]
    if cfg.model is None:
        for i, ex in enumerate(shown):
            lines += [f"\n--- example {i + 1} (normalised; pass --model to see it tokenized) ---",
                      json.dumps(ex, indent=2, ensure_ascii=False)]
        chars = [len(ex.get("text", "")) + sum(len(m["content"]) for m in ex.get("messages", [])) for ex in examples]
        lines.append(f"\ncharacters per example: {_stats(chars)}")
        return "\n".join(lines)

    from align.data.chat import encode_example, mark_completion

    tokenizer = _tokenizer_for(cfg.model)
    encoded = [encode_example(ex, tokenizer, cfg.completion_only_loss) for ex in examples]
    for i, enc in enumerate(encoded[: cfg.num_examples]):
        lines += [f"\n--- example {i + 1} (chat template applied; trained tokens in [[ ]]) ---",
                  mark_completion(tokenizer, enc["input_ids"], enc["assistant_masks"])]
    lengths = [len(e["input_ids"]) for e in encoded]
    trained = [sum(e["assistant_masks"]) for e in encoded]
    too_long = sum(n > cfg.max_length for n in lengths)
    empty = sum(t == 0 for t in trained)
    lines += [
        f"\ntokens per example:   {_stats(lengths)}",
        f"trained tokens:       {_stats(trained)}  (total {sum(trained)} of {sum(lengths)})",
        f"truncated at --max-length {cfg.max_length}: {too_long} of {len(lengths)} examples",
    ]
    if empty:
        lines.append(f"WARNING: {empty} example(s) have no trained token and would be dropped.")
    return "\n".join(lines)


def main(cfg: InspectConfig) -> str:
    cfg.validate()
    return inspect(cfg)
