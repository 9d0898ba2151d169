import math

import pytest
import torch

from elign.engine.losses import clipped_surrogate, gaussian_kl_same_std, per_sample_coefficients
from elign.engine.rollout import StepLogProbs
from elign.engine.strategies.base import BatchCounts, LossInputs
from elign.engine.strategies.fed_grpo import FedGRPOStrategy


def test_clipped_surrogate_hand_computed():
    ratio = torch.tensor([[1.5, 0.5, 1.01]])
    logp_old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, r, clipped = clipped_surrogate(ratio.log(), logp_old, adv, clip_range=0.2)
    # max(-A*rho, -A*clip(rho)): (-1.5 vs -1.2) -> -1.2; (-0.5 vs -0.8) -> -0.5; (1.01 vs 1.01)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5, 1.01]]))
    torch.testing.assert_close(r, ratio)
    assert clipped.tolist() == [[True, True, False]]


def test_clipped_surrogate_gradient_vanishes_when_clipped_in_advantage_direction():
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, _, _ = clipped_surrogate(logp, torch.zeros(1, 1), torch.ones(1, 1), 0.2)
    loss.sum().backward()
    assert logp.grad.item() == 0.0


def test_gaussian_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mean_p, mean_q = torch.randn(2, 5), torch.randn(2, 5)
    std = torch.tensor([0.7, 1.3])
    mask = torch.ones(2, 5)
    closed = gaussian_kl_same_std(mean_p, mean_q, std, mask)
    x = mean_p + std[:, None] * torch.randn(200_000, 2, 5)
    p = torch.distributions.Normal(mean_p, std[:, None])
    q = torch.distributions.Normal(mean_q, std[:, None])
    mc = (p.log_prob(x) - q.log_prob(x)).sum(-1).mean(0)
    torch.testing.assert_close(closed, mc, rtol=0.03, atol=0.02)


def test_gaussian_kl_respects_mask():
    kl = gaussian_kl_same_std(torch.ones(1, 3), torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1.0, 0.0, 1.0]]))
    torch.testing.assert_close(kl, torch.tensor([1.0]))


def make_strategy(**kw):
    args = dict(channel_weights={"a": 1.0}, default_weight=1.0, advantage_mode="terminal", pbrs_gamma=1.0,
                adv_clip=5.0, std_eps=1e-8, clip_range=0.2, kl_coef=0.5)
    args.update(kw)
    return FedGRPOStrategy(**args)


def test_strategy_loss_adds_kl_and_normalises_by_denominator():
    s = make_strategy()
    logp = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    # Gaussian steps with |mu - mu_ref| = 2 in one dimension and std 1: KL = 2^2 / 2 = 2 per pair
    reference = StepLogProbs(logp=logp, mean=torch.full((2, 2, 1), 2.0), ref_mean=torch.zeros(2, 2, 1),
                             std=torch.ones(2, 2))
    mask = torch.tensor([[True, True], [True, False]])
    counts = BatchCounts(tokens=6.0, sequences=2, samples=2, global_tokens=6.0, global_sequences=2, world_size=1,
                         max_steps=2)
    loss, sums = s.loss(LossInputs(logp, torch.zeros(2, 2), adv, mask, mask.sum(1), counts, reference))
    # per pair: -A*1 + 0.5*2 -> [0, 0], [2, (2)] ; masked sum = 2 ; / 6
    torch.testing.assert_close(loss, torch.tensor(2.0 / 6.0))
    assert float(sums["count"]) == 3.0 and float(sums["kl"]) == 6.0 and float(sums["clipped"]) == 0.0


def test_per_sample_coefficients_hand_computed():
    mask = torch.tensor([[False, True, True], [True, True, True], [False, False, False]])
    coef = torch.tensor([[0.0, -0.5, -0.5], [0.25, 0.25, 0.25], [0.0, 0.0, 0.0]])
    assert per_sample_coefficients(coef, mask).tolist() == [-0.5, 0.25, 0.0]
    # A value off the mask does not count; one that differs on it is per-step weighting.
    assert per_sample_coefficients(coef + torch.tensor([[9.0, 0, 0], [0, 0, 0], [0, 0, 0]]), mask).tolist() == [-0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="per-step advantages"):
        per_sample_coefficients(coef + torch.tensor([[0, 0, 0.1], [0, 0, 0], [0, 0, 0]]), mask)
