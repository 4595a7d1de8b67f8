"""Advantage estimation for the online-RL stages (pure tensor functions, no model code).

Shapes: (batch, T) per-token tensors with a 0/1 `mask` marking real completion tokens (right padding = 0).

GAE (Schulman et al. 2016), per sequence, over its real tokens t = 0..L-1, with V(L) = 0 after the last token:

    δ_t = r_t + γ·V(t+1) − V(t)
    A_t = δ_t + γ·λ·A_(t+1)        (A_L = 0)
    R_t = A_t + V(t)               (the value targets, "returns")

RLHF rewards (see `rlhf_token_rewards`): the sequence score lands on the last real token, and every token pays
the KL penalty −β·(log π(a_t|s_t) − log π_ref(a_t|s_t)) (the "N implementation details of RLHF with PPO": detail
#9, per-token KL in the reward; the score at the EOS token).

Whitening (`whiten`): (x − mean) / std over the masked entries, optionally keeping the mean (detail #4).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean)/std over masked entries (mean kept when shift_mean=False); masked-out entries become 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def rlhf_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                       mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: −kl_coef·(logπ − logπ_ref) on every real token, plus the sequence score on the last one.

    Returns (rewards, per-token KL), both (batch, T) and zero on padding.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores * (mask.sum(dim=1) > 0)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation; zero on padding."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = values[:, t] * m  # beyond a sequence's end (m = 0) the next value is 0
    return advantages, (advantages + values) * mask

