"""Pure diffusion maths against hand computations and torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from elign.edm.diffusion import (
    gaussian_kl_same_sigma,
    gaussian_log_prob,
    predict_clean,
    remove_com,
    reverse_step,
    sample_com_free_noise,
    sample_latent_noise,
)

MASK = torch.tensor([[True, True, True, False], [True, True, False, False]])


def test_remove_com_hand_case() -> None:
    x = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [2.0, 0.0, 3.0], [3.0, 3.0, 0.0], [9.0, 9.0, 9.0]],
            [[0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [5.0, 5.0, 5.0], [5.0, 5.0, 5.0]],
        ]
    )
    expected = torch.tensor(
        [
            [[-1.0, -1.0, -1.0], [0.0, -1.0, 2.0], [1.0, 2.0, -1.0], [0.0, 0.0, 0.0]],
            [[0.0, -1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        ]
    )
    torch.testing.assert_close(remove_com(x, MASK), expected)


def test_com_free_noise_is_centred_masked_and_seeded() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_com_free_noise((2, 4, 3), MASK, generator=g1)
    b = sample_com_free_noise((2, 4, 3), MASK, generator=g2)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.sum(dim=1), torch.zeros(2, 3), atol=1e-6, rtol=0)
    assert torch.all(a[~MASK] == 0) and a[MASK].abs().sum() > 0
    z = sample_latent_noise((2, 4, 9), MASK, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(z[..., :3].sum(dim=1), torch.zeros(2, 3), atol=1e-6, rtol=0)
    assert torch.all(z[~MASK] == 0)
    assert z[..., 3:].sum(dim=1).abs().max() > 1e-3  # features are not centred


def test_reverse_step_matches_textbook_formulas() -> None:
    gamma_t = torch.tensor([0.7, -2.0])
    gamma_s = torch.tensor([-0.4, -3.5])
    z_t = torch.randn(2, 4, 9) * MASK.unsqueeze(-1)
    eps = torch.randn(2, 4, 9) * MASK.unsqueeze(-1)
    mean, sigma = reverse_step(z_t, eps, gamma_t, gamma_s)
    for m in range(2):
        a2t, a2s = 1 / (1 + math.exp(gamma_t[m].item())), 1 / (1 + math.exp(gamma_s[m].item()))
        s2t, s2s = 1 - a2t, 1 - a2s
        a_ts = math.sqrt(a2t / a2s)
        s2_ts = s2t - a_ts**2 * s2s  # variance of q(z_t | z_s)
        mu = z_t[m] / a_ts - s2_ts / (a_ts * math.sqrt(s2t)) * eps[m]
        torch.testing.assert_close(mean[m], mu, atol=1e-5, rtol=1e-5)
        assert sigma[m].item() == pytest.approx(math.sqrt(s2_ts * s2s / s2t), rel=1e-5)


def test_gaussian_log_prob_equals_torch_normal() -> None:
    torch.manual_seed(0)
    mean = torch.randn(2, 4, 9)
    z = mean + 0.3 * torch.randn(2, 4, 9)
    sigma = torch.tensor([0.25, 0.6])
    ours = gaussian_log_prob(z, mean, sigma, MASK)
    dense = Normal(mean, sigma.view(2, 1, 1)).log_prob(z)  # [2, 4, 9]
    ref = (dense * MASK.unsqueeze(-1)).sum(dim=(1, 2))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-6)


def test_gaussian_kl_equals_torch_kl() -> None:
    torch.manual_seed(1)
    mp, mq = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    sigma = torch.tensor([0.5, 2.0])
    kl = kl_divergence(Normal(mp, sigma.view(2, 1, 1)), Normal(mq, sigma.view(2, 1, 1)))
    ref = (kl * MASK.unsqueeze(-1)).sum(dim=(1, 2))
    torch.testing.assert_close(gaussian_kl_same_sigma(mp, mq, sigma, MASK), ref, atol=1e-5, rtol=1e-5)


def test_predict_clean_inverts_forward_noising() -> None:
    torch.manual_seed(2)
    z0, eps = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    gamma = torch.tensor([-1.0, 2.5])
    alpha, sigma = torch.sigmoid(-gamma).sqrt().view(2, 1, 1), torch.sigmoid(gamma).sqrt().view(2, 1, 1)
    torch.testing.assert_close(predict_clean(alpha * z0 + sigma * eps, eps, gamma), z0, atol=1e-5, rtol=1e-5)
