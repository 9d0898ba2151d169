"""Policy-gradient losses: pure functions over ``[B, T]`` tensors (``B`` samples, ``T`` steps)."""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_surrogate(
    logp: Tensor, logp_old: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate, per element: ``max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))``.

    Args:
        logp: ``[B, T]`` log-probs under the current policy (with gradients).
        logp_old: ``[B, T]`` log-probs under the sampling policy.
        advantages: ``[B, T]``.
        clip_range: epsilon.

    Returns:
        ``(loss [B, T], ratio [B, T], clipped [B, T] bool)``; ``clipped`` marks
        ``|rho - 1| > eps`` (what ``train/clip_frac`` averages).
    """
    ratio = torch.exp(logp - logp_old)
    unclipped = -advantages * ratio
    clipped_obj = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped_obj)
    clipped = (ratio.detach() - 1.0).abs() > clip_range
    return loss, ratio, clipped


def gaussian_kl_same_std(mean_p: Tensor, mean_q: Tensor, std: Tensor, mask: Tensor) -> Tensor:
    """``KL(N(mean_p, std^2 I) || N(mean_q, std^2 I))`` summed over masked dimensions.

    For equal isotropic variances the KL is ``|mean_p - mean_q|^2 / (2 std^2)``.

    Args:
        mean_p, mean_q: ``[M, ...]``.
        std: ``[M]`` (one std per sample) or broadcastable to ``mean_p``.
        mask: broadcastable to ``mean_p``; dimensions that exist.

    Returns:
        ``[M]``.
    """
    diff2 = (mean_p - mean_q) ** 2 * mask
    per_sample = diff2.reshape(diff2.shape[0], -1).sum(dim=1)
    s = std.reshape(std.shape[0], -1)[:, 0] if std.dim() > 0 else std
    return per_sample / (2.0 * s**2)


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """``sum(values * mask)`` as a 0-d tensor."""
    return (values * mask.to(values.dtype)).sum()


def per_sample_coefficients(coef: Tensor, mask: Tensor, rtol: float = 1e-6) -> Tensor:
    """The one coefficient per sample of a ``[B, T]`` loss gradient that is constant over each sample's
    masked steps (terminal advantages), so that ``grad = sum_i c_i sum_t grad log p_{i,t}``.

    Args:
        coef: ``[B, T]``, ``d loss / d log p`` at the sampling weights.
        mask: ``[B, T]`` bool, the steps that enter the loss.
        rtol: tolerance, relative to the largest ``|coef|``.
    Returns:
        ``[B]``; 0 for a sample with no masked step.
    Raises:
        ValueError: a sample's coefficients differ between its steps (e.g. per-step advantages).
    """
    mask = mask.bool()
    first = torch.where(mask.any(dim=1), mask.float().argmax(dim=1), 0)
    c = coef.gather(1, first.unsqueeze(1)).squeeze(1) * mask.any(dim=1)
    spread = ((coef - c.unsqueeze(1)).abs() * mask).max() if mask.any() else coef.new_zeros(())
    if spread > rtol * coef.abs().max().clamp_min(torch.finfo(coef.dtype).tiny):
        raise ValueError(f"the loss weights the steps of a sample differently (spread {float(spread):.3g}): "
                         "per-step advantages need the replay update")
    return c
