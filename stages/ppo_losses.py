"""PPO losses and the adaptive KL controller (pure tensor functions). Per-token tensors are (batch, T) with a
0/1 `mask`; losses are masked means over real tokens.

Policy (clipped surrogate), with ratio ρ_t = exp(log π(a_t) − log π_old(a_t)):

    L_π = E[ w_t·max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε)) ]

where w_t are the rollout-correction weights π_old/π_sampler (truncated or masked, `--is-correction`; 1 without).

Value (clipped, detail #3 of "N implementation details of RLHF with PPO"), with V_clip = V_old + clip(V − V_old,
−ε_v, ε_v):

    L_V = ½·E[ max((V − R)², (V_clip − R)²) ]

Diagnostics: clip fraction E[|ρ − 1| > ε], approximate KL E[½(log ρ)²] (Schulman's k2), entropy of the policy's
token distribution.

Adaptive KL (Ziegler et al. 2019): β ← β·(1 + K_β·e), e = clip(KL/KL_target − 1, −0.2, 0.2), K_β = n_steps/horizon.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.stages.advantages import masked_mean


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float = 0.2, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_token if weights is None else per_token * weights, mask)
    stats = {
        "clipfrac": masked_mean((torch.abs(ratio - 1) > cliprange).float(), mask),
        "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
    }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    return loss, {"value_clipfrac": masked_mean((clipped_err > unclipped_err).float(), mask)}


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the token distributions at the masked positions (logits: batch × T × vocab)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over masked entries (1 = perfect value predictions, ≤ 0 = useless)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return 1 - var_d / var_r.clamp(min=1e-8)


@dataclass
class AdaptiveKL:
    """KL coefficient that tracks a target KL (fixed when target is None)."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + error * n_steps / self.horizon
        return self.value
