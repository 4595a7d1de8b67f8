"""`align orpo`: Odds Ratio Preference Optimization (Hong et al. 2024) on TRL's experimental ORPOTrainer —
preference learning with no reference model: an SFT term on the chosen answers plus an odds-ratio penalty.

Loss, per batch of pairs (TRL 1.16, trl/experimental/orpo): with the length-normalised log-likelihood
ℓ(y|x) = (1/|y|) Σ_t log π(y_t | x, y_<t) and odds(y|x) = p/(1 − p), p = exp ℓ(y|x),

    L = NLL_chosen − β · mean_pairs log σ( log odds(y_w|x) − log odds(y_l|x) )
    log odds(y|x) = ℓ(y|x) − log(1 − exp ℓ(y|x))

where NLL_chosen is the token-mean cross-entropy of the chosen sequences — in TRL over every token of
prompt + chosen answer (not only the answer, unlike the paper's SFT term) — and β = `--beta` (the paper's λ).
Logged: nll_loss, log_odds_ratio (the mean log σ term), log_odds_chosen, rewards/* = β·ℓ (no reference).

Reference-free: nothing is frozen, so the hand-off is plain — from a base (`--model`, fresh adapter) or a policy
run (`--from RUN`: its adapter continued, or merged with `--handoff merge`), and the first step is not at any fixed
value. `align simpo` (stages/simpo.py) shares this module's trainer wiring.

Data: preference pairs (align.data.preference), as `align dpo`. Raises AlignError (exit 2) for config/data/parent
problems, all reported before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from align.adapters import AdapterOptions
from align.config import Config, opt
from align.stages.common import as_dataset, finish_stage, launch_or_join, start_stage, trainer_arguments
from align.stages.dpo import load_preference_data
from align.stages.options import DataOptions, ModelOptions, TrainOptions


@dataclass
class ORPOConfig(TrainOptions, DataOptions, AdapterOptions, ModelOptions, Config):
    lr: float = opt(5e-5, "Peak learning rate.", range="(0, inf)")
    beta: float = opt(0.1, "β (the paper's λ): weight of the odds-ratio term against the SFT term on chosen answers.",
                      range="(0, inf)")


def load_reference_free_data(cfg):
    """Preference pairs for orpo / simpo, refusing tool-calling pairs (a `tools` column): TRL's experimental ORPO and
    CPO trainers apply the chat template without a row's tools, so the model would be trained on a system turn it
    never sees when it samples with them."""
    from align.errors import AlignError

    train, evaluation, datasets = load_preference_data(cfg)
    for rows, spec in ((train, cfg.data), (evaluation or [], getattr(cfg, "eval_data", None) or cfg.data)):
        if any("tools" in r for r in rows):
            raise AlignError(f"{spec}: these pairs carry a `tools` column (tool-calling conversations), which TRL's "
                             "ORPO/CPO trainers do not render; train on them with align dpo (or kto, rm).")
    return train, evaluation, datasets


def train_reference_free(cfg, stage: str, trainer_class, trl_config_class, **loss_args) -> Path:
    """The lifecycle of a reference-free preference stage (orpo, simpo): preference pairs, one TRL trainer, no
    frozen reference. `loss_args` go to the TRL config."""
    if (workers_run := launch_or_join(cfg, stage, load_reference_free_data)) is not None:
        return workers_run  # --num-processes: the launched processes trained
    started = start_stage(cfg, stage, load_reference_free_data)
    args = trl_config_class(**trainer_arguments(cfg, started.run, started.evaluation is not None),
                            max_length=cfg.max_length, remove_unused_columns=False, **loss_args)
    return finish_stage(
        started, cfg, stage=stage, task="causal-lm", reference="none (reference-free loss)",
        make_trainer=lambda callbacks: trainer_class(
            model=started.policy.model, args=args, processing_class=started.policy.tokenizer,
            train_dataset=as_dataset(started.train), eval_dataset=as_dataset(started.evaluation), callbacks=callbacks,
        ),
    )


def main(cfg: ORPOConfig) -> Path:
    """Run ORPO as configured; returns the run directory."""
    import warnings

    with warnings.catch_warnings():  # TRL's "experimental API" notice: the module docstring says so
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
        from trl.experimental.orpo import ORPOTrainer

    return train_reference_free(cfg, "orpo", ORPOTrainer, TRLORPOConfig, beta=cfg.beta)
