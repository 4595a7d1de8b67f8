"""`align data inspect D [--model M]`: the first thing to run on a new dataset.

Prints which stages can use the data (it is read the way each stage reads it: conversations for sft, preference
pairs for dpo / rm, unpaired feedback (prompt, completion, label; pairs split in two) for kto, labelled rows (text or
prompt + completion with a 0/1 `label` or a numeric `score`) for the pointwise rm, prompts for grpo / ppo / pairs /
distill / eval), the detected format, the example count (and for unpaired feedback the desirable / undesirable
counts; for labelled rows the pointwise rm's target columns and loss), examples as the model will see them (rendered with the chat template; the tokens trained on are
wrapped in [[ ]]), token-length statistics and how many examples --max-length would truncate. Without --model, shows the
normalised records and character lengths. Data no stage can read gets each reader's reason.
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


READERS = {  # how each family of stages reads a dataset: (stages, loader)
    "conversations": ("sft", "align.data:load_examples"),
    "preference pairs": ("dpo, orpo, simpo, rm, rm score, eval (preference accuracy)", "align.data.preference:load_preferences"),
    "unpaired feedback": ("kto", "align.data.unpaired:load_unpaired"),
    "labelled rows": ("rm (pointwise)", "align.data.pointwise:load_pointwise"),
    "prompts": ("grpo, ppo, pairs, distill, eval, rewards check", "align.data.prompts:load_prompts"),
}


def read_all_ways(cfg: InspectConfig) -> tuple[dict[str, tuple[list, str, object]], dict[str, str]]:
    """{kind: (rows, format, records)} for every reader that accepts the data, and {kind: why not} for the others."""
    import importlib

    from align.errors import AlignError

    read, refused = {}, {}
    for kind, (_, ref) in READERS.items():
        if cfg.format != "auto" and kind != "conversations":
            continue  # --format names a conversation format: only sft's reader applies
        module, _, name = ref.partition(":")
        loader = getattr(importlib.import_module(module), name)
        kwargs = dict(split=cfg.split, columns=cfg.columns, system_prompt=cfg.system_prompt)
        try:
            if kind == "conversations":
                read[kind] = loader(cfg.data, fmt=cfg.format, **kwargs)
            else:
                rows, records = loader(cfg.data, **kwargs)
                read[kind] = (rows, kind, records)
        except AlignError as e:
            refused[kind] = str(e).splitlines()[0]
    return read, refused


def inspect(cfg: InspectConfig) -> str:
    from align.errors import AlignError

    read, refused = read_all_ways(cfg)
    if not read:
        raise AlignError(f"{cfg.data}: no stage can read this dataset:",
                         [f"as {kind} ({READERS[kind][0]}): {why}" for kind, why in refused.items()])
    kind = next(iter(read))
    examples, fmt, records = read[kind]
    lines = [f"dataset:  {records.source}", f"format:   {fmt}", f"examples: {len(examples)}",
             f"columns:  {', '.join(records.columns())}",
             "usable by: " + "; ".join(f"{READERS[k][0]} (as {k})" for k in read)]
    if kind == "unpaired feedback":
        desirable = sum(ex["label"] for ex in examples)
        lines.insert(3, f"labels:   {desirable} desirable (true), {len(examples) - desirable} undesirable (false)")
    if "labelled rows" in read:
        extra = read["labelled rows"][2].extra
        lines.insert(-1, f"targets:  {', '.join(extra['heads'])} ({extra['objective']}) for the pointwise rm")
    shown = examples[: cfg.num_examples]
    if cfg.model is None or kind != "conversations":
        for i, ex in enumerate(shown):
            lines += [f"\n--- example {i + 1} (normalised; pass --model to see it tokenized) ---",
                      json.dumps(ex, indent=2, ensure_ascii=False)]
        lines.append(f"\ncharacters per example: {_stats([_characters(ex) for ex in examples])}")
        if cfg.model is not None:
            tokenizer = _tokenizer_for(cfg.model)
            texts = [ex["text"] if "text" in ex else tokenizer.apply_chat_template(
                _conversation(ex), tools=ex.get("tools"), tokenize=False) for ex in examples]
            lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
            what = {"prompts": "prompt", "unpaired feedback": "prompt + completion",
                    "labelled rows": "text or prompt + completion"}.get(kind, "prompt + longer answer")
            lines.append(f"tokens per example ({what}): "
                         f"{_stats(lengths)}")
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


def _characters(ex: dict) -> int:
    def size(value) -> int:
        if isinstance(value, str):
            return len(value)
        if isinstance(value, list):
            return sum(size(m.get("content", "")) if isinstance(m, dict) else size(m) for m in value)
        return 0

    return size(ex.get("text", "")) + sum(size(ex.get(k, [])) for k in ("messages", "prompt")) + \
        max(size(ex.get("chosen", [])), size(ex.get("rejected", [])), size(ex.get("completion", [])))


def _conversation(ex: dict) -> list[dict]:
    """The longest conversation a record stands for: prompt + the longer of chosen/rejected (or its completion), or the
    prompt."""
    answers = [ex[k] for k in ("chosen", "rejected", "completion") if isinstance(ex.get(k), list)]
    return list(ex.get("prompt", [])) + (max(answers, key=lambda a: sum(len(m["content"]) for m in a)) if answers else [])


def main(cfg: InspectConfig) -> str:
    cfg.validate()
    return inspect(cfg)
