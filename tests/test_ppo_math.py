"""Advantage estimation and PPO losses against hand computations (with masks and padding)."""

from __future__ import annotations

import math

import pytest
import torch

from align.stages.advantages import gae, rlhf_token_rewards, whiten
from align.stages.ppo_losses import AdaptiveKL, explained_variance, policy_loss, value_loss


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype))


def test_gae_and_returns_by_hand_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # second sequence: 2 real tokens, padding ignored
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # sequence 1
    d2 = 1.0 - 0.3
    d1 = 0.0 + gamma * 0.3 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.1
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    # sequence 2 (V after the last real token is 0)
    e1 = 2.0 - 0.5
    e0 = 0.5 + gamma * 0.5 - 0.4
    b1, b0 = e1, e0 + gamma * lam * e1
    close(adv, [[a0, a1, a2], [b0, b1, 0.0]])
    close(ret, [[a0 + 0.1, a1 + 0.2, a2 + 0.3], [b0 + 0.4, b1 + 0.5, 0.0]])


def test_rlhf_rewards_put_score_on_last_token_and_kl_everywhere():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = rlhf_token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.0, 0.1 + 2.0], [-0.1, 0.0 - 1.0, 0.0]])


def test_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = whiten(x, mask)
    vals = torch.tensor([1.0, 2.0, 3.0])
    expected = (vals - vals.mean()) / vals.std()
    assert w[mask.bool()].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert w[~mask.bool()].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("ratio, adv, expected", [
    (1.5, 1.0, -1.2),   # positive advantage: ratio clipped at 1 + ε
    (0.5, 1.0, -0.5),   # positive advantage, ratio below 1 − ε: unclipped (pessimistic) term wins
    (0.5, -1.0, 0.8),   # negative advantage: clipped at 1 − ε
    (1.5, -1.0, 1.5),   # negative advantage, ratio above 1 + ε: unclipped term wins
])
def test_clipped_policy_loss_by_hand(ratio, adv, expected):
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(ratio), 5.0]])
    mask = torch.tensor([[1, 0]])
    loss, stats = policy_loss(new, old, torch.tensor([[adv, 3.0]]), mask, cliprange=0.2)
    assert loss.item() == pytest.approx(expected)
    assert stats["clipfrac"].item() == 1.0 and stats["approx_kl"].item() == pytest.approx(0.5 * math.log(ratio) ** 2)


def test_rollout_correction_weights_scale_each_tokens_policy_loss():
    old = torch.zeros(2, 2)
    new = torch.tensor([[math.log(1.1), math.log(0.5)], [0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    weights = torch.tensor([[0.5, 2.0], [0.0, 1.0]])  # e.g. truncated, and one token masked (MIS)
    loss, _ = policy_loss(new, old, adv, mask, cliprange=0.2, weights=weights)
    per_token = [-1.1, -0.5, -2.0]  # max(-A·ρ, -A·clip(ρ)) on the 3 real tokens
    assert loss.item() == pytest.approx((0.5 * per_token[0] + 2.0 * per_token[1] + 0.0 * per_token[2]) / 3)


def test_clipped_value_loss_by_hand():
    values, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    loss, stats = value_loss(values, old, ret, torch.tensor([[1, 0]]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * max((1 - 2) ** 2, (0.2 - 2) ** 2))
    assert stats["value_clipfrac"].item() == 1.0


def test_explained_variance_and_adaptive_kl():
    ret = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 3) + 2.0, ret, mask).item() == pytest.approx(0.0)
    kl = AdaptiveKL(0.1, target=6.0, horizon=100)
    assert kl.update(12.0, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert AdaptiveKL(0.1).update(50.0, 10) == 0.1
