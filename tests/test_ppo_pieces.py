"""The pieces of methods/ppo.py on hand-worked values (the arithmetic is in the comments). Fast, no model."""

from __future__ import annotations

import math

import pytest
import torch

from methods.ppo import (AdaptiveKLController, clipped_policy_loss, clipped_value_loss, entropy_from_logits, gae,
                         kl_estimate, layout, whiten)


def close(actual, expected, tol=1e-4):
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32), torch.tensor(expected, dtype=torch.float32),
                          atol=tol)


def test_gae_by_hand():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]])
    # γ = 1, λ = 0.5; V after the last step is 0:
    # δ2 = 1 + 0 − .5 = .5            → A2 = .5
    # δ1 = 0 + .5 − .5 = 0            → A1 = 0 + .5·.5 = .25
    # δ0 = 0                          → A0 = 0 + .5·.25 = .125;   returns = A + V = [.625, .75, 1]
    advantages, returns = gae(rewards, values, gamma=1.0, lam=0.5)
    assert close(advantages, [[0.125, 0.25, 0.5]]) and close(returns, [[0.625, 0.75, 1.0]])
    # γ = .9, λ = 1 (Monte-Carlo): δ2 = .5, A2 = .5; δ1 = .9·.5 − .5 = −.05, A1 = −.05 + .9·.5 = .4;
    # δ0 = −.05, A0 = −.05 + .9·.4 = .31; returns = discounted reward-to-go [.81, .9, 1]
    advantages, returns = gae(rewards, values, gamma=0.9, lam=1.0)
    assert close(advantages, [[0.31, 0.4, 0.5]]) and close(returns, [[0.81, 0.9, 1.0]])


def test_gae_ends_the_episode_at_the_mask():
    # one real step, then padding whose values (9) must not leak back: A0 = r0 − V0 = 1 − .2 = .8
    advantages, returns = gae(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.2, 9.0, 9.0]]), gamma=1.0, lam=0.95,
                              mask=torch.tensor([[1, 0, 0]]))
    assert close(advantages, [[0.8, 0.0, 0.0]]) and close(returns, [[1.0, 0.0, 0.0]])


def test_clipped_policy_loss_by_hand():
    # ε = .2; per token (ratio ρ, advantage A) → −min(ρA, clip(ρ)A) = max(−ρA, −clip(ρ)A):
    # (1.5, +1): max(−1.5, −1.2) = −1.2 (clipped)      (0.5, +1): max(−.5, −.8) = −.5
    # (0.5, −1): max(.5, .8) = .8 (clipped)             (1.1, −2): max(2.2, 2.2) = 2.2
    # loss = (−1.2 − .5 + .8 + 2.2) / 4 = .325; clip fraction = 2/4
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.1])
    old = torch.zeros(4)
    loss, fraction = clipped_policy_loss(torch.log(ratios), old, torch.tensor([1.0, 1.0, -1.0, -2.0]), clip=0.2)
    assert close(loss, 0.325) and close(fraction, 0.5)
    # masking the two clipped tokens leaves (−.5 + 2.2)/2 = .85 and no clipping
    loss, fraction = clipped_policy_loss(torch.log(ratios), old, torch.tensor([1.0, 1.0, -1.0, -2.0]), clip=0.2,
                                         mask=torch.tensor([0, 1, 0, 1]))
    assert close(loss, 0.85) and close(fraction, 0.0)


def test_clipped_value_loss_by_hand():
    # ε_v = .2, V_old = 0, returns 1. Token 1: V_new = .5 → V_clip = .2; errors .25 vs .64 → .64 (clipped)
    # token 2: V_new = .1 (inside the clip) → both .81. loss = ½·(.64 + .81)/2 = .3625; clip fraction ½
    loss, fraction = clipped_value_loss(torch.tensor([0.5, 0.1]), torch.zeros(2), torch.ones(2), clip=0.2)
    assert close(loss, 0.3625) and close(fraction, 0.5)


def test_kl_estimators_by_hand_and_unbiased():
    logp, logp_ref = torch.log(torch.tensor(0.5)), torch.log(torch.tensor(0.25))
    # r = π_ref/π = .5: k1 = −log r = log 2 = .6931; k2 = ½(log .5)² = .2402; k3 = (r − 1) − log r = −.5 + .6931 = .1931
    assert close(kl_estimate(logp, logp_ref, "k1"), math.log(2))
    assert close(kl_estimate(logp, logp_ref, "k2"), 0.5 * math.log(0.5) ** 2)
    assert close(kl_estimate(logp, logp_ref, "k3"), -0.5 + math.log(2))
    # π = [.5, .5], π_ref = [.25, .75]: KL = .5·log 2 + .5·log(.5/.75) = .1438; E_π[k1] = E_π[k3] = KL exactly
    pi, ref = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    exact = float((pi * (pi / ref).log()).sum())
    assert close(exact, 0.1438)
    for kind in ("k1", "k3"):
        assert close((pi * kl_estimate(pi.log(), ref.log(), kind)).sum(), exact)
    with pytest.raises(ValueError):
        kl_estimate(logp, logp_ref, "k9")


def test_whiten_by_hand():
    # [1, 2, 3, 4]: mean 2.5, population variance (2.25 + .25 + .25 + 2.25)/4 = 1.25, std 1.1180
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert close(whiten(values), [-1.3416, -0.4472, 0.4472, 1.3416])
    assert close(whiten(values, shift_mean=False), [1.1584, 2.0528, 2.9472, 3.8416])  # + 2.5
    # masked: only [1, 3] count → mean 2, variance 1 → [−1, 1]; masked-out entries are 0
    assert close(whiten(values, mask=torch.tensor([1, 0, 1, 0])), [-1.0, 0.0, 1.0, 0.0])


def test_adaptive_kl_controller_by_hand():
    control = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9 → e = clip(9/6 − 1, ±.2) = .2 → β = .1·(1 + .2·100/10000) = .1002
    assert math.isclose(control.update(9.0, n_steps=100), 0.1002)
    # KL 3 → e = clip(−.5) = −.2 → β = .1002·(1 − .002) = .0999996
    assert math.isclose(control.update(3.0, n_steps=100), 0.1002 * 0.998)
    fixed = AdaptiveKLController(0.05)
    assert fixed.update(100.0, n_steps=100) == 0.05


def test_entropy_by_hand():
    # uniform over 2: ln 2; p = [.25, .75] (logits 0, ln 3): −(.25 ln .25 + .75 ln .75) = .3466 + .2158 = .5623
    entropy = entropy_from_logits(torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]))
    assert close(entropy, [math.log(2), 0.5623])


def test_rollout_layout_points_at_the_completion_tokens():
    rollout = layout([["a"], ["b"]], [[1, 2], [3]], [[7, 8, 2], [9]], ["x", "y"], pad=0)
    assert rollout.input_ids.tolist() == [[1, 2, 7, 8, 2], [3, 9, 0, 0, 0]]
    assert rollout.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert rollout.positions.tolist()[0] == [2, 3, 4] and rollout.positions.tolist()[1][0] == 1
    assert rollout.tokens.tolist() == [[7, 8, 2], [9, 0, 0]] and rollout.mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert rollout.lengths == [5, 2]
    part = rollout.select([1])  # a minibatch is trimmed to its own widths
    assert part.input_ids.tolist() == [[3, 9]] and part.tokens.tolist() == [[9]]
