"""`align kto`: Kahneman-Tversky Optimization on TRL's KTOTrainer — preference learning from unpaired feedback
(one completion per row, thumbs up or down) instead of pairs.

Starts from a base (`--model`, fresh adapter) or from a finished policy run (`--from RUN`, the same hand-off as
dpo, align.handoff). The reference model is the starting policy, frozen (TRL's "ref" copy of the adapter, or a
copy of the model for full fine-tuning), so the first step's loss is its reference value (below).

Loss (TRL's `kto`, Eq. 7 of Ethayarajh et al. 2024), with r(x, y) = log π(y|x) − log π_ref(y|x):

    desirable y:    w_d · (1 − σ(β · (r(x, y) − z_ref)))
    undesirable y:  w_u · (1 − σ(β · (z_ref − r(x, y))))
    z_ref = max(0, mean over the batch of r(x_i, y'_i)),  y'_i = the completion of the batch neighbour (i − 1)

averaged over the batch (w_d = `--desirable-weight`, w_u = `--undesirable-weight`). z_ref, the KL baseline, is
estimated from mismatched (prompt, completion) pairs: TRL rotates the completions by one inside each batch of
`--batch-size`, so the batch size must be at least 2, and TRL reads the data in order (no per-epoch shuffle).
align therefore shuffles the training (and held-out) rows once with `--seed` (`--no-shuffle` keeps the file's
order): a file sorted by label would otherwise give batches of one label only, and split pairs would put each
rejected completion next to the chosen one of the same prompt (not a mismatched pair for the baseline). With policy = reference every r and z_ref are 0
and the first loss is (w_d · n_d + w_u · n_u) / (2 · n) for a first batch of n_d desirable and n_u undesirable
rows. `--loss apo_zero_unpaired` drops z_ref: 1 − σ(β·r) for desirable, σ(β·r) for undesirable rows.
Imbalanced data: the KTO paper suggests w_d · n_d / (w_u · n_u) in [1, 4/3]; TRL warns when both weights lie
outside its range.

Data: unpaired feedback (align.data.unpaired): prompt/completion/label rows, or preference pairs split into a
desirable and an undesirable row (logged). Raises AlignError (exit 2) for config/data/parent problems, all
reported before any model loads.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from align.adapters import AdapterOptions
from align.config import Config, opt
from align.errors import Problems
from align.stages.common import (
    as_dataset,
    finish_stage,
    launch_or_join,
    load_train_eval,
    start_stage,
    trainer_arguments,
)
from align.stages.options import DataOptions, ModelOptions, TrainOptions

logger = logging.getLogger(__name__)


@dataclass
class KTOConfig(TrainOptions, DataOptions, AdapterOptions, ModelOptions, Config):
    lr: float = opt(5e-5, "Peak learning rate.", range="(0, inf)")
    batch_size: int = opt(8, "Examples per device per step (at least 2 with --loss kto: the KL baseline pairs each "
                             "prompt with its batch neighbour's completion).", range="[1, inf)")
    beta: float = opt(0.1, "β: strength of the implicit KL constraint to the reference (higher = stay closer).", range="(0, inf)")
    loss: Literal["kto", "apo_zero_unpaired"] = opt(
        "kto", "kto: the KTO loss with its KL baseline z_ref; apo_zero_unpaired: APO-zero, no baseline (raises "
               "desirable, lowers undesirable completions' likelihood relative to the reference).")
    desirable_weight: float = opt(1.0, "Weight w_d of the desirable (label true) rows' losses (for imbalanced data).", range="(0, inf)")
    undesirable_weight: float = opt(1.0, "Weight w_u of the undesirable (label false) rows' losses.", range="(0, inf)")
    shuffle: bool = opt(True, "Shuffle the training and held-out rows once with --seed (TRL's KTO reads them in order).")
    precompute_ref_log_probs: bool = opt(False, "Compute the reference log-probs once before training.")

    def check(self, problems: Problems) -> None:
        if self.loss == "kto" and self.batch_size < 2:
            problems.add(f"--batch-size {self.batch_size}: --loss kto estimates its KL baseline from the other "
                         "completions of the batch, so it needs at least 2. Raise --batch-size (or use --loss "
                         "apo_zero_unpaired, which has no baseline).")


def load_unpaired_data(cfg):
    """(train, eval, datasets) as unpaired feedback; the rows shuffled once with --seed (--shuffle)."""
    from align.data.unpaired import load_unpaired

    def load(spec: str, split):
        return load_unpaired(spec, split=split, columns=cfg.columns, system_prompt=cfg.system_prompt)

    train, evaluation, datasets = load_train_eval(cfg, load)
    for described in datasets.values():
        if described.get("unpaired_from") == "pairs":
            logger.info("%s: %d preference pairs split into unpaired feedback (chosen -> label true, rejected -> "
                        "label false)", described["source"], described["rows"])
    if cfg.shuffle:  # held-out rows too: their KL baseline is estimated the same way
        for rows in (train, evaluation or []):
            random.Random(cfg.seed).shuffle(rows)
    return train, evaluation, datasets


def main(cfg: KTOConfig) -> Path:
    """Run KTO as configured; returns the run directory."""
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    if (workers_run := launch_or_join(cfg, "kto", load_unpaired_data)) is not None:
        return workers_run  # --num-processes: the launched processes trained
    started = start_stage(cfg, "kto", load_unpaired_data)
    args = TRLKTOConfig(
        **trainer_arguments(cfg, started.run, started.evaluation is not None), max_length=cfg.max_length,
        beta=cfg.beta, loss_type=cfg.loss, desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight, precompute_ref_log_probs=cfg.precompute_ref_log_probs,
    )
    return finish_stage(
        started, cfg, stage="kto", task="causal-lm", reference="parent policy (frozen)",
        make_trainer=lambda callbacks: KTOTrainer(
            model=started.policy.model, ref_model=None, args=args, processing_class=started.policy.tokenizer,
            train_dataset=as_dataset(started.train), eval_dataset=as_dataset(started.evaluation), callbacks=callbacks,
        ),
    )
