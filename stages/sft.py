"""`align sft`: supervised fine-tuning with any adapter kind, on TRL's SFTTrainer.

Supports: every data format of align.data.formats (normalised to conversations or plain text); every adapter
kind of align.adapters (LoRA by default, QLoRA on a 4-bit base, prompt learning, full fine-tuning); loss on
assistant tokens only (default) or on every token; padding-free packing; an eval set (--eval-data or
--eval-split); resume from the last checkpoint.

Assumes: a causal-LM base whose tokenizer is a fast tokenizer (offsets are used to build the loss mask); a
tokenizer without a chat template gets align's fallback template (align.models).

Raises AlignError (exit 2) for every config or data problem, all reported together before any model loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from align.adapters import ADAPTERS, AdapterOptions
from align.config import Config, opt
from align.stages.common import finish_stage, launch_or_join, load_train_eval, start_stage, trainer_arguments
from align.stages.options import DataOptions, ModelOptions, TrainOptions

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig(TrainOptions, DataOptions, AdapterOptions, ModelOptions, Config):
    format: Literal["auto", "messages", "sharegpt", "alpaca", "qa", "prompt_completion", "text"] = opt(
        "auto", "Dataset format; auto detects it from the columns.")
    completion_only_loss: bool = opt(
        True, "Train only on assistant/completion tokens; --no-completion-only-loss trains on every token.")
    packing: bool = opt(True, "Pack examples into rows of --max-length tokens (each example attends only to itself; "
                              "--batch-size then counts rows). --no-packing pads each batch instead.")


def load_sft_data(cfg: SFTConfig):
    from align.data import load_examples

    def load(spec: str, split):
        examples, _, records = load_examples(spec, split=split, fmt=cfg.format, columns=cfg.columns,
                                             system_prompt=cfg.system_prompt)
        return examples, records

    return load_train_eval(cfg, load)


def main(cfg: SFTConfig) -> Path:
    """Run SFT as configured; returns the run directory."""
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from align.data.chat import check_fits, encode_dataset
    from align.data.packing import PackedRowCollator, pack_rows

    if (workers_run := launch_or_join(cfg, "sft", load_sft_data)) is not None:
        return workers_run  # --num-processes: the launched processes trained
    started = start_stage(cfg, "sft", load_sft_data)
    tokenizer = started.policy.tokenizer
    train_ds = encode_dataset(started.train, tokenizer, cfg.completion_only_loss, desc="Tokenizing train")
    eval_ds = (encode_dataset(started.evaluation, tokenizer, cfg.completion_only_loss, desc="Tokenizing eval")
               if started.evaluation else None)
    check_fits(train_ds, cfg.max_length)
    collator = None
    if cfg.packing and ADAPTERS[started.policy.adapter].prompt_learning:
        logger.info("Packing is off for the '%s' adapter: its virtual tokens must precede every example.",
                    started.policy.adapter)
    elif cfg.packing:
        train_ds = pack_rows(train_ds, cfg.max_length)
        eval_ds = pack_rows(eval_ds, cfg.max_length) if eval_ds is not None else None
        collator = PackedRowCollator(tokenizer.pad_token_id)
    args = TRLSFTConfig(**trainer_arguments(cfg, started.run, eval_ds is not None), max_length=cfg.max_length)
    return finish_stage(
        started, cfg, stage="sft", task="causal-lm",
        make_trainer=lambda callbacks: SFTTrainer(
            model=started.policy.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
            data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
        ),
    )
