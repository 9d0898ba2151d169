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
