"""EDM's supervised objective: noise prediction (the ``l2`` loss of Hoogeboom et al.)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from elign.edm.diffusion import N_POS, remove_com, sample_latent_noise, sigma_alpha
from elign.edm.schedule import PolynomialSchedule

ONE_HOT_SCALE = 4.0  # upstream normalize_factors = [1, 4, 10]: x / 1, one-hot / 4, atomic number / 10
CHARGE_SCALE = 10.0


def encode_latent(positions: Tensor, one_hot: Tensor, charges: Tensor, node_mask: Tensor) -> Tensor:
    """Clean latent ``x0 = [x (CoM-free), one_hot / 4, Z / 10]``.

    Args:
        positions: ``[M, N, 3]`` Å.
        one_hot: ``[M, N, K]`` atom-type one-hot.
        charges: ``[M, N]`` atomic numbers.
        node_mask: ``[M, N]`` bool.
    Returns:
        ``[M, N, 3 + K + 1]``, zero on padding.
    """
    m = node_mask.unsqueeze(-1).to(positions.dtype)
    h = torch.cat([one_hot.to(positions.dtype) / ONE_HOT_SCALE,
                   charges.to(positions.dtype).unsqueeze(-1) / CHARGE_SCALE], dim=-1)
    return torch.cat([remove_com(positions, node_mask), h * m], dim=-1)


def noise_prediction_loss(dynamics: nn.Module, schedule: PolynomialSchedule, x0: Tensor, node_mask: Tensor,
                          include_t0: bool = True) -> Tensor:
    """Mean squared error of the predicted noise at a uniformly drawn step (EDM's ``l2`` loss).

    ``t ~ U{0 (or 1), ..., T_schedule} / T_schedule``, ``z_t = alpha_t x0 + sigma_t eps`` with
    CoM-free position noise; the error is averaged over the valid atoms' ``3 + F`` dimensions of
    each molecule, then over molecules.

    Args:
        dynamics: ``eps_hat = dynamics(z_t [M, N, C], t [M], node_mask [M, N])``.
        schedule: the noise schedule.
        x0: ``[M, N, C]`` clean latents from :func:`encode_latent`.
        node_mask: ``[M, N]`` bool.
        include_t0: draw t = 0 as well (upstream does while training).
    Returns:
        scalar loss.
    """
    m = x0.shape[0]
    low = 0 if include_t0 else 1
    t = torch.randint(low, schedule.steps + 1, (m,), device=x0.device).to(torch.float64) / schedule.steps
    sigma, alpha = sigma_alpha(schedule.gamma(t).double())
    eps = sample_latent_noise(x0.shape, node_mask, dtype=x0.dtype)
    z_t = alpha.to(x0.dtype).view(-1, 1, 1) * x0 + sigma.to(x0.dtype).view(-1, 1, 1) * eps
    eps_hat = dynamics(z_t, t.to(x0.dtype), node_mask)
    mask = node_mask.unsqueeze(-1).to(x0.dtype)
    per_molecule = (((eps_hat - eps) * mask) ** 2).sum(dim=(1, 2)) / (mask.sum(dim=(1, 2)) * x0.shape[-1])
    return per_molecule.mean()
