"""Boltz-2's reverse sampler as a Gaussian policy with exact per-step log-probabilities (boltz.md §5.1).

boltz's ``AtomDiffusion.sample`` loop, step ``k = 0 .. N-1`` (σ_k from ``sample_schedule``, a final 0):

1. centre ``x`` (mean over all atom slots) and apply a fresh random rotation ``R_k`` and translation ``τ_k``;
2. ``t̂_k = σ_k (1 + γ_{k+1})`` with γ = γ_0 while the next σ exceeds γ_min, else 0; add
   ``ε ~ N(0, v_k)``, ``v_k = noise_scale² (t̂_k² − σ_k²)``: the noisy input ``x̃_k``;
3. ``D_k = D_θ(x̃_k, t̂_k)``; Kabsch-align ``x̃_k`` onto ``D_k`` (no gradient, as boltz);
4. ``x ← x̃_k + step_scale (σ_{k+1} − t̂_k)(x̃_k − D_k) / t̂_k``.

Given the recorded ``x̃_{k-1}``, ``R_k`` and ``τ_k``, ``x̃_k`` is Gaussian with mean
``μ_k(θ) = R_k (x_k − mean x_k) + τ_k`` (``x_k`` from step 4 of step ``k-1``) and the θ-free variance ``v_k``:
the actions are ``x̃_1 .. x̃_{N-1}``; those with ``v_k = 0`` (the low-noise tail) are deterministic and not
trained. :func:`sample_trajectory` draws from torch's global RNG in boltz's order, so a seed gives boltz's
own samples (tested bitwise against ``Boltz2Core.sample``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["Schedule", "Trajectory", "gaussian_log_prob", "sampler_schedule", "sample_trajectory", "step_mean",
           "step_update"]


@dataclass
class Schedule:
    """The sampler's per-step constants (``N`` steps).

    Attributes:
        sigma: ``[N + 1]`` noise levels σ_k, the last 0.
        t_hat: ``[N]`` the raised levels t̂_k the denoiser sees.
        var: ``[N]`` variance v_k of the noise added at step k (0 in the deterministic tail).
        step_scale: boltz's step multiplier.
        noise_scale: boltz's noise multiplier.
        align: Kabsch-align the noisy input onto the denoised one (``alignment_reverse_diff``).
    """

    sigma: Tensor
    t_hat: Tensor
    var: Tensor
    step_scale: float
    noise_scale: float
    align: bool

    @property
    def num_steps(self) -> int:
        return int(self.t_hat.numel())

    @property
    def trained(self) -> Tensor:
        """``[N - 1]`` bool: which actions ``x̃_1 .. x̃_{N-1}`` are stochastic."""
        return self.var[1:] > 0


def sampler_schedule(structure_module: torch.nn.Module, num_steps: int) -> Schedule:
    """The schedule boltz's ``AtomDiffusion`` would sample with (its own ``sample_schedule``)."""
    m = structure_module
    sigma32 = m.sample_schedule(num_steps).cpu()
    # γ in float32 as boltz has it (0.8 -> 0.800000011920929 in its .item()): t̂ matches boltz's bit for bit.
    gamma = torch.where(sigma32 > m.gamma_min, m.gamma_0, 0.0).double()
    sigma = sigma32.double()
    # boltz pairs step k's σ_k with the *next* level's γ (zip(sigmas[:-1], sigmas[1:], gammas[1:])).
    t_hat = sigma[:-1] * (1 + gamma[1:])
    var = float(m.noise_scale) ** 2 * (t_hat**2 - sigma[:-1] ** 2)
    return Schedule(sigma=sigma, t_hat=t_hat, var=var, step_scale=float(m.step_scale),
                    noise_scale=float(m.noise_scale), align=bool(m.alignment_reverse_diff))


def step_update(x_noisy: Tensor, denoised: Tensor, t_hat: Tensor | float, sigma_next: Tensor | float,
                step_scale: float, atom_mask: Tensor, align: bool) -> Tensor:
    """Step 3-4: ``x_noisy`` (aligned onto ``denoised`` without gradient) moved toward ``denoised``.

    Args:
        x_noisy, denoised: ``[n, M, 3]``.
        t_hat, sigma_next: floats (one step for all rows: boltz's own arithmetic, bit for bit) or ``[n]``
            (rows of different steps in one call, as the log-prob recomputation has them).
        atom_mask: ``[n, M]``.
    Returns:
        ``[n, M, 3]``; differentiable in ``denoised``.
    """
    if align:
        from boltz.model.loss.diffusionv2 import weighted_rigid_align

        mask = atom_mask.float()
        x_noisy = weighted_rigid_align(x_noisy.float(), denoised.detach().float(), mask, mask).to(denoised)
    if torch.is_tensor(t_hat):
        t_hat = t_hat.to(denoised).view(-1, 1, 1)
        sigma_next = torch.as_tensor(sigma_next).to(denoised).view(-1, 1, 1)
    return x_noisy + step_scale * (sigma_next - t_hat) * ((x_noisy - denoised) / t_hat)


def step_mean(x: Tensor, rotation: Tensor, translation: Tensor) -> Tensor:
    """Step 1: ``R (x − mean x) + τ`` (mean over every atom slot, as boltz). ``x`` ``[n, M, 3]``,
    ``rotation`` ``[n, 3, 3]``, ``translation`` ``[n, 1, 3]``."""
    x = x - x.mean(dim=-2, keepdim=True)
    return torch.einsum("bmd,bds->bms", x, rotation) + translation


def gaussian_log_prob(x: Tensor, mean: Tensor, var: Tensor, atom_mask: Tensor) -> Tensor:
    """Isotropic Gaussian log-density of the real atoms: ``Σ_{atoms, xyz} −(x − μ)² / 2v − ½ log(2π v)``.

    Args:
        x, mean: ``[n, M, 3]``. var: ``[n]`` (> 0). atom_mask: ``[n, M]``.
    Returns:
        ``[n]``.
    """
    var = var.to(mean).view(-1, 1, 1)
    density = -((x - mean) ** 2) / (2 * var) - 0.5 * torch.log(2 * math.pi * var)
    return (density * atom_mask.to(mean).unsqueeze(-1)).sum(dim=(-1, -2))


@dataclass
class Trajectory:
    """One batch of sampled structures and what their log-probs need (``S`` samples, ``N`` steps).

    Attributes:
        noisy: ``[S, N, M, 3]`` the noisy inputs x̃_0 .. x̃_{N-1}.
        rotations: ``[S, N, 3, 3]``; translations: ``[S, N, 1, 3]`` (step k's R_k, τ_k).
        coords: ``[S, M, 3]`` the sampled structures.
        logp: ``[S, N - 1]`` log-probs of x̃_1 .. x̃_{N-1} under the sampling weights (0 where deterministic).
    """

    noisy: Tensor
    rotations: Tensor
    translations: Tensor
    coords: Tensor
    logp: Tensor


@torch.no_grad()
def sample_trajectory(denoise: Callable[[Tensor, Tensor], Tensor], schedule: Schedule, atom_mask: Tensor,
                      num_samples: int, shared_steps: int = 0) -> Trajectory:
    """Run boltz's sampler and record the trajectory.

    Args:
        denoise: ``(x̃ [n, M, 3], t̂ [n]) -> D [n, M, 3]``, the n rows being samples of one target on the
            multiplicity axis (n = S, or 1 in a shared prefix).
        schedule: from :func:`sampler_schedule`.
        atom_mask: ``[M]`` real atoms of the target.
        num_samples: ``S``.
        shared_steps: the first this many steps run as one sample (one noise and augmentation draw) that all S
            samples share, branching at step ``shared_steps``; 0 = boltz's sampler, independent samples.
    """
    from boltz.model.modules.utils import compute_random_augmentation

    steps, m = schedule.num_steps, atom_mask.shape[-1]
    device = atom_mask.device
    x = schedule.sigma[0].float().to(device) * torch.randn((num_samples, m, 3), device=device)
    if shared_steps > 0:
        x = x[:1]  # the shared prefix runs as one sample: the denoiser sees 1 row, not S equal ones
    noisy, rotations, translations, logps = [], [], [], []
    for k in range(steps):
        if k == shared_steps and x.shape[0] != num_samples:
            x = x.expand(num_samples, m, 3).contiguous()
        n = x.shape[0]
        mask = atom_mask.reshape(1, m).expand(n, m)
        rotation, translation = compute_random_augmentation(n, device=device, dtype=x.dtype)
        mean = step_mean(x, rotation, translation)
        var = float(schedule.var[k])
        x_noisy = mean + math.sqrt(var) * torch.randn((n, m, 3), device=device)
        if k > 0:
            logp = gaussian_log_prob(x_noisy, mean, torch.full((n,), var), mask) if var > 0 else \
                torch.zeros(n, device=device)
            logps.append(logp.expand(num_samples))
        t_hat = float(schedule.t_hat[k])
        denoised = denoise(x_noisy, torch.full((n,), t_hat, device=device))
        x = step_update(x_noisy, denoised, t_hat, float(schedule.sigma[k + 1]), schedule.step_scale, mask,
                        schedule.align)
        noisy.append(x_noisy.expand(num_samples, m, 3))
        rotations.append(rotation.expand(num_samples, 3, 3))
        translations.append(translation.expand(num_samples, 1, 3))
    x = x.expand(num_samples, m, 3)
    logp = torch.stack(logps, 1) if logps else torch.zeros(num_samples, 0, device=device)
    return Trajectory(noisy=torch.stack(noisy, 1), rotations=torch.stack(rotations, 1),
                      translations=torch.stack(translations, 1), coords=x, logp=logp)
