"""`align simpo`: Simple Preference Optimization (Meng et al. 2024) on TRL's experimental CPOTrainer
(loss_type="simpo") — a DPO-like loss with no reference model: the implicit reward is the length-normalised
log-likelihood, and chosen must beat rejected by a target margin γ.

Loss, per batch of pairs (TRL 1.16, trl/experimental/cpo), with ℓ(y|x) = (1/|y|) Σ_t log π(y_t | x, y_<t) over the
answer's tokens:

    L = mean_pairs −log σ( β · (ℓ(y_w|x) − ℓ(y_l|x)) − γ )  +  α · NLL_chosen

β = `--beta`, γ = `--gamma` (TRL's simpo_gamma; TRL writes it as β·(Δℓ − γ/β)), α = `--sft-weight` (TRL's
cpo_alpha; 0 = plain SimPO, > 0 adds the token-mean cross-entropy of the chosen answers: CPO-SimPO). Defaults
β = 2, γ = 1 follow the SimPO paper's base-model settings (γ/β = 0.5). Logged: rewards/* = β·ℓ, nll_loss.

Reference-free: nothing is frozen (see align.stages.orpo, whose trainer wiring this stage shares); the first step's
loss is −log σ(β·Δℓ − γ) of the starting policy, not a fixed value.

Data: preference pairs (align.data.preference), as `align dpo`. Raises AlignError (exit 2) for config/data/parent
problems, all reported before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from align.adapters import AdapterOptions
from align.config import Config, opt
from align.stages.options import DataOptions, ModelOptions, TrainOptions
from align.stages.orpo import load_reference_free_data, train_reference_free  # noqa: F401 - the loader KINDS names


@dataclass
class SimPOConfig(TrainOptions, DataOptions, AdapterOptions, ModelOptions, Config):
    lr: float = opt(5e-5, "Peak learning rate.", range="(0, inf)")
    beta: float = opt(2.0, "β: scale of the reward difference (the length-normalised log-likelihoods).", range="(0, inf)")
    gamma: float = opt(1.0, "γ: target reward margin chosen must win by (TRL's simpo_gamma).", range="[0, inf)")
    sft_weight: float = opt(0.0, "α: weight of an SFT (NLL) term on the chosen answers; 0 = plain SimPO (TRL's cpo_alpha).",
                            range="[0, inf)")


def main(cfg: SimPOConfig) -> Path:
    """Run SimPO as configured; returns the run directory."""
    import warnings

    with warnings.catch_warnings():  # TRL's "experimental API" notice: the module docstring says so
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        from trl.experimental.cpo import CPOConfig, CPOTrainer

    return train_reference_free(cfg, "simpo", CPOTrainer, CPOConfig, loss_type="simpo", beta=cfg.beta,
                                simpo_gamma=cfg.gamma, cpo_alpha=cfg.sft_weight)
