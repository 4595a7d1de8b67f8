"""`align dpo`: Direct Preference Optimization on TRL's DPOTrainer.

Starts from a base (`--model`, fresh adapter) or from a finished policy run (`--from RUN`, see align.handoff:
continue the parent's adapter by default, or merge it and train a fresh one). The reference model is the
starting policy, frozen: TRL copies the trainable adapter into a frozen "ref" adapter of the same model (no
second model in memory), or keeps a copy of the model for full fine-tuning. Hence the first step's loss is
ln 2 and the reward margins are 0, whatever the parent's adapter did.

Loss (sigmoid, the default): -log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]),
with label smoothing ε: (1−ε)·that + ε·(the same with w and l swapped). `--loss` takes every loss TRL 1.16
offers (ipo, hinge, robust, ...); several are combined with `--loss-weights`.
`--precompute-ref-log-probs` computes the reference log-probs once before training (no reference forward per
step).

Data: preference pairs (align.data.preference). Raises AlignError (exit 2) for config/data/parent problems,
all reported before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from align.adapters import AdapterOptions
from align.config import Config, opt
from align.errors import Problems, unknown_name
from align.stages.common import (
    as_dataset,
    finish_stage,
    launch_or_join,
    load_train_eval,
    start_stage,
    trainer_arguments,
)
from align.stages.options import DataOptions, ModelOptions, TrainOptions

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOConfig(TrainOptions, DataOptions, AdapterOptions, ModelOptions, Config):
    lr: float = opt(5e-5, "Peak learning rate.", range="(0, inf)")
    beta: float = opt(0.1, "β: strength of the implicit KL constraint to the reference (higher = stay closer).", range="(0, inf)")
    loss: list[str] = opt(factory=lambda: ["sigmoid"], help="DPO loss variant(s): " + ", ".join(DPO_LOSSES) + ".")
    loss_weights: list[float] | None = opt(None, "Weights when several --loss variants are combined.")
    label_smoothing: float = opt(0.0, "Label smoothing ε (conservative/robust DPO): assumed rate of flipped labels.", range="[0, 0.5)")
    precompute_ref_log_probs: bool = opt(False, "Compute the reference log-probs once before training.")

    def check(self, problems: Problems) -> None:
        for name in self.loss:
            if name not in DPO_LOSSES:
                problems.add("--loss: " + unknown_name("DPO loss", name, DPO_LOSSES))
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss):
            problems.add(f"--loss-weights has {len(self.loss_weights)} values for {len(self.loss)} --loss variants.")
        if self.beta <= 0:
            problems.add(f"--beta must be positive, got {self.beta}.")
        if not 0 <= self.label_smoothing < 0.5:
            problems.add(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}.")


def load_preference_data(cfg):
    from align.data.preference import load_preferences

    def load(spec: str, split):
        return load_preferences(spec, split=split, columns=cfg.columns, system_prompt=cfg.system_prompt)

    return load_train_eval(cfg, load)


def main(cfg: DPOConfig) -> Path:
    """Run DPO as configured; returns the run directory."""
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    if (workers_run := launch_or_join(cfg, "dpo", load_preference_data)) is not None:
        return workers_run  # --num-processes: the launched processes trained
    started = start_stage(cfg, "dpo", load_preference_data)
    args = TRLDPOConfig(
        **trainer_arguments(cfg, started.run, started.evaluation is not None), max_length=cfg.max_length,
        beta=cfg.beta, loss_type=list(cfg.loss), loss_weights=cfg.loss_weights, label_smoothing=cfg.label_smoothing,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
    )
    return finish_stage(
        started, cfg, stage="dpo", task="causal-lm", reference="parent policy (frozen)",
        make_trainer=lambda callbacks: DPOTrainer(
            model=started.policy.model, ref_model=None, args=args, processing_class=started.policy.tokenizer,
            train_dataset=as_dataset(started.train), eval_dataset=as_dataset(started.evaluation), callbacks=callbacks,
        ),
    )
