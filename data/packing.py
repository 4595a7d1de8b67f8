"""Packing: several examples share one row of up to `max_length` tokens, with no cross-example attention.

Rows are packed best-fit-decreasing by TRL's `pack_dataset` (examples longer than `max_length` are
truncated). Unlike TRL's padding-free collator, which flattens the whole batch into one sequence (linear cost
with FlashAttention's varlen kernels, but quadratic in the *batch* length with SDPA/eager attention), this
collator keeps rows separate: position_ids restart at every example and no attention mask is passed, so
transformers builds a block-diagonal causal mask per row (`find_packed_sequence_indices`). Cost per row is
that of one padded row of `max_length`, without the padding. The first token of each example gets label -100
(it must not be predicted from the previous example).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def pack_rows(dataset, max_length: int):
    """Pack a dataset with input_ids/labels into rows (adds `seq_lengths`)."""
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset.select_columns(["input_ids", "labels"]), max_length, "bfd",
                        map_kwargs={"desc": "Packing"})


@dataclass
class PackedRowCollator:
    """Batches packed rows: input_ids, labels, per-example position_ids; no attention mask."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            lengths = list(row.get("seq_lengths") or [n])
            if width > n:
                lengths.append(width - n)  # the padding tail is a sequence of its own (all labels -100)
            position_ids[i] = torch.cat([torch.arange(length) for length in lengths])
        labels[position_ids == 0] = -100
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
