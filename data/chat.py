"""Turn normalised examples into token ids and a loss mask.

Conversations are rendered with the tokenizer's chat template. The loss mask covers the assistant turns:
for assistant turn i, the text the template adds for it is

    render(messages[:i+1])  minus  render(messages[:i], add_generation_prompt=True)

i.e. the reply and the template's end-of-turn marker (so the model learns to stop). Those character spans of
the full rendering are mapped to tokens through the fast tokenizer's offsets. A template that rewrites earlier
turns (so that renderings are not prefixes of each other) leaves such a turn unmasked, and an example with no
maskable assistant token is dropped with a warning. Plain-text examples are trained on every token, with EOS
appended. With `completion_only=False` every token of a conversation is trained on.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans of each assistant turn within it (`tools`: the function schemas
    the template shows the model)."""
    full = _render(tokenizer, messages, tools=tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools) if i else ""
        upto = _render(tokenizer, messages[: i + 1], tools=tools)
        if full.startswith(upto) and upto.startswith(before) and len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


def encode_example(example: dict[str, Any], tokenizer, completion_only: bool = True) -> dict[str, list[int]]:
    """{"input_ids", "assistant_masks"} for one normalised example."""
    if "text" in example:
        ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return {"input_ids": ids, "assistant_masks": [1] * len(ids)}
    text, spans = assistant_spans(tokenizer, example["messages"], example.get("tools"))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if not completion_only:
        return {"input_ids": enc["input_ids"], "assistant_masks": [1] * len(enc["input_ids"])}
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in enc["offset_mapping"]]
    return {"input_ids": enc["input_ids"], "assistant_masks": mask}


def with_labels(example: dict[str, list[int]]) -> dict[str, list[int]]:
    """labels = input_ids where the mask is 1, else -100."""
    return {"labels": [t if m else -100 for t, m in zip(example["input_ids"], example["assistant_masks"], strict=True)]}


def encode_dataset(examples: list[dict], tokenizer, completion_only: bool = True, desc: str = "Tokenizing"):
    """A `datasets.Dataset` with input_ids / labels, dropping examples with nothing to train on."""
    import datasets
    from tqdm.auto import tqdm

    # encoded here rather than by Dataset.map: tool schemas and call arguments differ from row to row, which one
    # Arrow schema for the raw examples cannot hold
    ds = datasets.Dataset.from_list([encode_example(ex, tokenizer, completion_only)
                                     for ex in tqdm(examples, desc=desc, leave=False)])
    before = len(ds)
    ds = ds.filter(lambda ex: any(ex["assistant_masks"]), desc="Dropping examples without trainable tokens")
    if len(ds) < before:
        logger.warning("Dropped %d example(s) whose chat-template rendering left no assistant token to train on.",
                       before - len(ds))
    return ds.map(with_labels, remove_columns=["assistant_masks"], desc="Building labels")


def check_fits(dataset, max_length: int, flag: str = "--max-length") -> None:
    """At least one example must keep a trained token within its first `max_length` tokens (a trained token is
    predicted from the ones before it, so position 0 never counts); AlignError otherwise."""
    from align.errors import AlignError

    def fits(labels: list[int]) -> bool:
        return any(t != -100 for t in labels[1:max_length])

    kept = sum(fits(labels) for labels in dataset["labels"])
    if not kept:
        shortest = min(next((i for i, t in enumerate(labels) if t != -100), len(labels)) for labels in dataset["labels"])
        raise AlignError(f"{flag} {max_length}: no training example keeps a token to train on — each one's prompt "
                         f"(with the chat template) fills it; the shortest is {shortest} tokens before its answer. Use "
                         f"{flag} {max(2 * shortest, 64)} or more.")
    if kept < len(dataset):
        logger.warning("%d of %d example(s) lose every trained token at %s %d; raise it to train on them.",
                       len(dataset) - kept, len(dataset), flag, max_length)


def mark_completion(tokenizer, input_ids: list[int], mask: list[int], start: str = "[[", end: str = "]]") -> str:
    """Decode `input_ids` with the trained (mask=1) stretches wrapped in start/end markers."""
    out, run, current = [], [], None
    for tok, m in zip(input_ids, mask, strict=True):
        if m != current and run:
            text = tokenizer.decode(run)
            out.append(f"{start}{text}{end}" if current else text)
            run = []
        current = m
        run.append(tok)
    if run:
        text = tokenizer.decode(run)
        out.append(f"{start}{text}{end}" if current else text)
    return "".join(out)
