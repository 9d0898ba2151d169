"""Pure tensor maths of EDM's reverse diffusion as a Gaussian policy (spec elign.md §1.1).

Latents are ``z = [x (3), h (F)]`` per atom, ``[M, N, 3 + F]`` for ``M`` molecules padded to ``N``
atoms with a ``[M, N]`` bool node mask. Padding entries are kept at zero. The position part always
lies in the zero-centre-of-mass (CoM) subspace. Per-molecule schedule values (``gamma_t``) are ``[M]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from elign.engine.losses import gaussian_kl_same_std

N_POS = 3  # number of position channels at the front of every latent


def _mask3(mask: Tensor, like: Tensor) -> Tensor:
    """``[M, N]`` bool mask as ``[M, N, 1]`` in ``like``'s dtype."""
    return mask.unsqueeze(-1).to(like.dtype)


def _per_molecule(value: Tensor) -> Tensor:
    """``[M]`` -> ``[M, 1, 1]`` so it broadcasts over atoms and channels."""
    return value.reshape(-1, 1, 1)


def remove_com(x: Tensor, mask: Tensor) -> Tensor:
    """Subtract the centre of mass of the valid atoms; padding is set to zero.

    Args:
        x: ``[M, N, D]`` (usually ``D = 3`` positions).
        mask: ``[M, N]`` bool.
    Returns:
        ``[M, N, D]`` with ``sum_i x[m, i] = 0`` over the valid atoms of each molecule.
    """
    m = _mask3(mask, x)
    # clamp: an all-padding row would otherwise divide by zero (it stays zero anyway).
    count = m.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (x * m).sum(dim=1, keepdim=True) / count
    return (x - mean) * m


def sample_com_free_noise(
    shape: tuple[int, ...] | torch.Size,
    mask: Tensor,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard Gaussian on the valid atoms, projected to zero CoM (a Gaussian on that subspace).

    Args:
        shape: ``(M, N, D)``.
        mask: ``[M, N]`` bool.
        generator: optional RNG; the global RNG otherwise.
        dtype: floating type (torch's default if None).
    Returns:
        ``[M, N, D]`` noise, zero on padding.
    """
    eps = torch.randn(tuple(shape), generator=generator, device=mask.device, dtype=dtype)
    return remove_com(eps, mask)


def sample_latent_noise(
    shape: tuple[int, ...] | torch.Size,
    mask: Tensor,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """EDM latent noise ``[M, N, 3 + F]``: CoM-free Gaussian for positions, standard for features.

    Both parts are drawn in one ``randn`` call so a seeded RNG gives the same stream regardless of F.
    """
    eps = torch.randn(tuple(shape), generator=generator, device=mask.device, dtype=dtype)
    return torch.cat([remove_com(eps[..., :N_POS], mask), eps[..., N_POS:] * _mask3(mask, eps)], dim=-1)


def sigma_alpha(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """``(sigma, alpha)`` from ``gamma`` (same shape), variance preserving."""
    return torch.sigmoid(gamma).sqrt(), torch.sigmoid(-gamma).sqrt()


def transition_params(gamma_t: Tensor, gamma_s: Tensor) -> tuple[Tensor, Tensor]:
    """``(alpha_{t|s}, sigma^2_{t|s})`` of the forward transition ``q(z_t | z_s)``, each ``[M]``.

    Computed in log space like upstream: ``1 - alpha^2_{t|s}`` via expm1 stays accurate when the two
    times are close (alpha_{t|s} -> 1).
    """
    sigma2_ts = -torch.expm1(F.softplus(gamma_s) - F.softplus(gamma_t))
    alpha_ts = torch.exp(0.5 * (F.logsigmoid(-gamma_t) - F.logsigmoid(-gamma_s)))
    return alpha_ts, sigma2_ts


def reverse_step(z_t: Tensor, eps_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std of the policy ``p(z_s | z_t)`` for ``s < t``.

    ``mu = z_t / alpha_{t|s} - sigma^2_{t|s} / (alpha_{t|s} sigma_t) * eps_hat`` and
    ``sigma_{t->s} = sigma_{t|s} sigma_s / sigma_t`` (independent of the network parameters).

    The per-molecule coefficients are computed in float64 and then cast: float32 transcendental
    kernels can differ by an ulp between vectorised and scalar code paths, i.e. with the batch
    size, and ``1 / alpha_{t|s}`` multiplies latents that can be large, so the sampler and the
    re-scoring in ``log_prob`` would otherwise disagree.

    Args:
        z_t: ``[M, N, C]`` current latents (masked, position part CoM-free).
        eps_hat: ``[M, N, C]`` predicted noise (masked, position part CoM-free).
        gamma_t, gamma_s: ``[M]``.
    Returns:
        ``mean`` ``[M, N, C]`` and ``sigma`` ``[M]`` (in ``z_t``'s dtype).
    """
    gamma_t, gamma_s = gamma_t.double(), gamma_s.double()
    alpha_ts, sigma2_ts = transition_params(gamma_t, gamma_s)
    sigma_t, _ = sigma_alpha(gamma_t)
    sigma_s, _ = sigma_alpha(gamma_s)
    dtype = z_t.dtype
    coef = (sigma2_ts / (alpha_ts * sigma_t)).to(dtype)
    mean = z_t / _per_molecule(alpha_ts.to(dtype)) - _per_molecule(coef) * eps_hat
    sigma = (sigma2_ts.sqrt() * sigma_s / sigma_t).to(dtype)
    return mean, sigma


def predict_clean(z_t: Tensor, eps_hat: Tensor, gamma_t: Tensor) -> Tensor:
    """``z0_hat = (z_t - sigma_t eps_hat) / alpha_t``: ``[M, N, C]`` from ``[M, N, C]`` and ``gamma_t [M]``
    (coefficients in float64, see :func:`reverse_step`)."""
    sigma_t, alpha_t = sigma_alpha(gamma_t.double())
    dtype = z_t.dtype
    return (z_t - _per_molecule(sigma_t.to(dtype)) * eps_hat) / _per_molecule(alpha_t.to(dtype))


def sample_step(mean: Tensor, sigma: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``z_s = mean + sigma * eta`` (eta from :func:`sample_latent_noise`), positions re-projected to
    zero CoM against float drift. ``mean`` ``[M, N, C]``, ``sigma`` ``[M]`` -> ``[M, N, C]``."""
    z = mean + _per_molecule(sigma) * sample_latent_noise(mean.shape, mask, generator, mean.dtype)
    return torch.cat([remove_com(z[..., :N_POS], mask), z[..., N_POS:] * _mask3(mask, z)], dim=-1)


def gaussian_log_prob(z_s: Tensor, mean: Tensor, sigma: Tensor, mask: Tensor) -> Tensor:
    """Isotropic Gaussian log-density summed over the valid atoms and all channels.

    ``sum_{i valid} sum_c [ -(z - mu)^2 / (2 sigma^2) - log sigma - log(2 pi) / 2 ]``.

    Zero-CoM convention: like the ELIGN code this counts all ``n * C`` masked dims. The position
    part really lives on a ``(n - 1) * 3``-dimensional subspace; since both ``z_s`` and ``mean`` lie in
    it, the quadratic term is the subspace density's and the normaliser is off only by
    ``3 * (log sigma + log(2 pi) / 2)``. ``sigma`` depends on t alone (no parameters), so that constant
    cancels exactly in importance ratios and in KLs between policies at the same step.

    Args:
        z_s, mean: ``[M, N, C]``.
        sigma: ``[M]`` (or a scalar).
        mask: ``[M, N]`` bool.
    Returns:
        ``[M]`` log-probabilities.
    """
    m = _mask3(mask, z_s)
    sigma = torch.as_tensor(sigma, dtype=z_s.dtype, device=z_s.device).expand(z_s.shape[0])
    sq = (((z_s - mean) * m) ** 2).sum(dim=(1, 2))
    dims = m.sum(dim=(1, 2)) * z_s.shape[-1]
    return -sq / (2.0 * sigma**2) - dims * (torch.log(sigma) + 0.5 * math.log(2.0 * math.pi))


def gaussian_kl_same_sigma(mean_p: Tensor, mean_q: Tensor, sigma: Tensor, mask: Tensor) -> Tensor:
    """``KL(N(mean_p, sigma^2 I) || N(mean_q, sigma^2 I)) = sum (mean_p - mean_q)^2 / (2 sigma^2)``
    over the valid atoms and all channels (the engine's closed form with the EDM atom mask).
    ``[M, N, C]``, ``[M, N, C]``, ``[M]``, ``[M, N]`` -> ``[M]``."""
    sigma = torch.as_tensor(sigma, dtype=mean_p.dtype, device=mean_p.device).expand(mean_p.shape[0])
    return gaussian_kl_same_std(mean_p, mean_q, sigma, _mask3(mask, mean_p))
