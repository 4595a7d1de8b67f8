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


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, total=None) -> torch.Tensor:
    """Mean of x over mask (per row with `dim`); `total` sums a tensor over processes (a mean over all of them)."""
    mask = mask.to(x.dtype)
    if dim is None:
        if total is not None:
            return total((x * mask).sum()) / total(mask.sum()).clamp(min=1)
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, total=None) -> torch.Tensor:
    mean = masked_mean(x, mask, total=total)
    var = masked_mean((x - mean) ** 2, mask, total=total)
    n = mask.sum() if total is None else total(mask.sum())
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           total=None) -> torch.Tensor:
    """(x − mean)/std over masked entries (mean kept when shift_mean=False); masked-out entries become 0. `total`
    (several processes): a function summing a tensor over them, so mean and std are those of the global batch."""
    mean, var = masked_mean(x, mask, total=total), masked_var(x, mask, total=total)
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



# -- critic-free advantages (align grpo --advantage) ----------------------------------------------------------
def group_advantages(rewards: torch.Tensor, k: int, estimator: str, scale: str, eps: float = 1e-4) -> torch.Tensor:
    """Advantages of N = groups·k sequence rewards (groups consecutive; NaN = unscorable, advantage 0).

    grpo          A_i = r_i − mean(group)                                  (GRPO, Shao et al. 2024)
    rloo          A_i = r_i − mean(group without i) = k/(k−1)·(r_i − mean) (RLOO, Ahmadian et al. 2024)
    reinforce_pp  A_i = c_i − mean_batch(c),  c_i = r_i − mean(group)      (REINFORCE++ with a group baseline,
                  then normalised over the batch: divide by the batch std, `scale="batch"`; Hu et al. 2025)
    then `scale`: "group" divides by the group's std, "batch" by the std of the centred values over the batch,
    "none" leaves them. Means and stds skip NaN; stds are the unbiased (n−1) ones, as TRL's.
    """
    grouped = rewards.view(-1, k)
    valid = ~torch.isnan(grouped)
    count = valid.sum(1, keepdim=True)
    total = torch.nansum(grouped, 1, keepdim=True)
    if estimator == "rloo":
        baseline = (total - torch.nan_to_num(grouped)) / (count - 1).clamp(min=1)
    else:
        baseline = total / count.clamp(min=1)
    centred = grouped - baseline
    if estimator == "reinforce_pp":
        centred = centred - torch.nanmean(centred)
    if scale == "group":
        centred = centred / (_nanstd(grouped, 1) + eps)
    elif scale == "batch":
        centred = centred / (_nanstd(centred.flatten(), 0) + eps)
    return torch.nan_to_num(centred.flatten(), nan=0.0)


def _nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Unbiased std along `dim` over the non-NaN entries (kept dim for dim=1)."""
    valid = ~torch.isnan(x)
    n = valid.sum(dim, keepdim=dim == 1)
    mean = torch.nansum(x, dim, keepdim=True) / valid.sum(dim, keepdim=True).clamp(min=1)
    sq = torch.nansum((x - mean) ** 2, dim, keepdim=dim == 1)
    return torch.sqrt(sq / (n - 1).clamp(min=1))


def importance_weights(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, mode: str,
                       high: float | None, low: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollout-correction weights w = π_trainer(y|x) / π_sampler(y|x) and the fraction of them cut.

    mode: token_truncate (TIS: per-token w clipped to [low, high]), token_mask (MIS: per-token w outside [low, high]
    set to 0), sequence_truncate / sequence_mask (one w per sequence: exp Σ_t (log π_trainer − log π_sampler)).
    Returns (weights of shape (B, T) or (B, 1), fraction of weights outside [low, high] among real tokens /
    sequences). NaN sampler log-probs count as no mismatch (w = 1), as in TRL.
    """
    diff = torch.nan_to_num((trainer_logps - sampler_logps) * mask, nan=0.0)
    sequence = mode.startswith("sequence")
    if sequence:
        diff = diff.sum(-1, keepdim=True)
    weights = torch.exp(diff)
    lo, hi = (low if low is not None else -float("inf")), (high if high is not None else float("inf"))
    outside = (weights < lo) | (weights > hi)
    if mode.endswith("truncate"):
        weights = weights.clamp(min=low, max=high)
    else:
        weights = weights.masked_fill(outside, 0.0)
    real = torch.ones_like(outside, dtype=torch.bool) if sequence else mask.bool()
    return weights, (outside & real).sum() / real.sum().clamp(min=1)
