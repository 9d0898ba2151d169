"""Policy-gradient losses: pure functions over ``[B, T]`` tensors (``B`` samples, ``T`` steps).

The pieces of a clipped policy-gradient loss, each chosen by a strategy's configuration:
importance weights (per token, or per sequence as in GSPO), the clipped surrogate (asymmetric
``epsilon_low`` / ``epsilon_high``, optional two-sided ``delta``), a KL estimator (closed-form
Gaussian or k3) and the aggregation of per-pair losses into the loss of a micro-batch
(``grpo | bnpo | dr_grpo | dapo``), scaled so that the micro-batches and step chunks of one
optimizer step add up to the loss of the whole step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # rollout.py imports this module: no runtime import back
    from elign.engine.rollout import StepLogProbs
    from elign.engine.strategies.base import BatchCounts

IMPORTANCE_LEVELS = ("token", "sequence")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KL_ESTIMATORS = ("k3", "gaussian")


def importance_weights(
    logp: Tensor, logp_old: Tensor, mask: Tensor | None = None, level: str = "token",
    seq_tokens: Tensor | None = None,
) -> Tensor:
    """Importance weights of the recorded actions, per pair.

    ``token``: ``rho_it = exp(logp_it - logp_old_it)``.
    ``sequence`` (GSPO): ``s_i = exp(sum_t (logp_it - logp_old_it) M_it / n_i)`` with ``n_i`` the
    sample's trained steps, broadcast over its steps. The gradient flows through the mean as in
    TRL: ``d s_i / d logp_it = s_i M_it / n_i``.

    Off the mask the log-ratio is taken as 0 (weight 1), so padding whose log-probs are ``-inf``
    cannot turn the loss or its gradient into NaN.

    Args:
        logp: ``[b, t]`` log-probs under the current policy (with gradients).
        logp_old: ``[b, t]`` log-probs under the behaviour policy.
        mask: ``[b, t]`` bool, trained pairs; None = all (``token`` level only).
        level: ``token`` or ``sequence``.
        seq_tokens: ``[b]`` trained steps of each sample (``n_i``); default ``mask.sum(-1)``. Only
            a chunk that holds whole sequences gives the sequence weight.

    Returns:
        ``[b, t]`` weights.
    """
    log_ratio = logp - logp_old
    if mask is not None:
        log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))
    if level == "token":
        return torch.exp(log_ratio)
    if level != "sequence":
        raise ValueError(f"unknown importance sampling level {level!r}; allowed: {IMPORTANCE_LEVELS}")
    if mask is None:
        raise ValueError("a sequence-level importance weight needs the mask of the trained steps")
    n = mask.sum(dim=-1) if seq_tokens is None else seq_tokens
    seq_log = log_ratio.sum(dim=-1) / n.to(log_ratio.dtype).clamp(min=1.0)
    return torch.exp(seq_log).unsqueeze(-1).expand_as(log_ratio)


def clipped_objective(
    ratio: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float, delta: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO/GRPO clipped surrogate per pair: ``-min(rho' A, clip(rho, 1 - eps_low, 1 + eps_high) A)``.

    ``rho' = min(rho, delta)`` when ``delta`` is set (INTELLECT-2 two-sided clipping: a negative
    advantage with a huge ratio is capped too), else ``rho``.

    Args:
        ratio: ``[b, t]`` importance weights (with gradients).
        advantages: ``[b, t]``.
        epsilon_low, epsilon_high: lower and upper clip widths.
        delta: cap of the unclipped ratio, or None.

    Returns:
        ``(loss [b, t], low [b, t] bool, high [b, t] bool)``: TRL's clip indicators
        ``low = rho' < 1 - eps_low and A < 0``, ``high = rho' > 1 + eps_high and A > 0`` (the pairs
        whose gradient the clip removes; TRL evaluates them on the delta-capped ratio too).
    """
    clipped_ratio = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    if delta is not None:
        ratio = ratio.clamp(max=delta)
    loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    r = ratio.detach()
    low = (r < 1.0 - epsilon_low) & (advantages < 0)
    high = (r > 1.0 + epsilon_high) & (advantages > 0)
    return loss, low, high


def clipped_surrogate(
    logp: Tensor, logp_old: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate with a symmetric clip, per element:
    ``max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))`` (:func:`clipped_objective` with
    ``eps_low = eps_high = eps``, which gives the same bits).

    Args:
        logp: ``[B, T]`` log-probs under the current policy (with gradients).
        logp_old: ``[B, T]`` log-probs under the sampling policy.
        advantages: ``[B, T]``.
        clip_range: epsilon.

    Returns:
        ``(loss [B, T], ratio [B, T], clipped [B, T] bool)``; ``clipped`` marks
        ``|rho - 1| > eps`` whatever the sign of ``A`` (FED-GRPO's ``train/clip_frac``).
    """
    ratio = importance_weights(logp, logp_old)
    loss, _, _ = clipped_objective(ratio, advantages, clip_range, clip_range)
    return loss, ratio, outside_band(ratio, clip_range)


def outside_band(ratio: Tensor, clip_range: float) -> Tensor:
    """``[B, T]`` bool, ``|rho - 1| > eps``: ratios outside the clip band, whatever the advantage."""
    return (ratio.detach() - 1.0).abs() > clip_range


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of ``KL(pi_theta || pi_ref)`` from actions sampled from the policy:
    ``exp(ref - logp) - (ref - logp) - 1`` per pair (unbiased, and >= 0 pair by pair).

    Args:
        logp: ``[b, t]`` log-probs under the current policy (with gradients).
        ref_logp: ``[b, t]`` log-probs of the same actions under the reference.

    Returns:
        ``[b, t]``.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


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


def gaussian_step_kl(mean: Tensor, ref_mean: Tensor, std: Tensor, event_mask: Tensor | None = None) -> Tensor:
    """Closed-form KL of each step's Gaussian action distribution to the reference's (shared std).

    Args:
        mean, ref_mean: ``[b, t, ...]`` means under the policy and the reference.
        std: ``[b, t]`` the step's standard deviation.
        event_mask: broadcastable to ``mean`` with leading ``[b, t]``; action dimensions that
            exist. None = all.

    Returns:
        ``[b, t]``.
    """
    b, t = mean.shape[:2]
    mask = torch.ones_like(mean) if event_mask is None else event_mask
    return gaussian_kl_same_std(mean.flatten(0, 1), ref_mean.flatten(0, 1), std.reshape(-1),
                                mask.flatten(0, 1)).view(b, t)


def reference_kl(reference: "StepLogProbs", logp: Tensor, estimator: str, mask: Tensor | None = None) -> Tensor:
    """``[b, t]`` KL to the reference by ``estimator`` (``k3`` from ``reference.ref_logp``,
    ``gaussian`` from the means); ``logp`` is ``[b, t]`` with gradients; ``mask`` ``[b, t]`` (the
    trained pairs; k3 is 0 elsewhere)."""
    if estimator == "k3":
        if reference.ref_logp is None:
            raise ValueError("kl_estimator=k3 needs the reference log-probs; the policy returned none")
        ref = reference.ref_logp
        if mask is not None:
            # Padding may hold -inf log-probs: select before they enter k3, whose backward would
            # multiply its NaN into the gradient even where the loss masks it out.
            keep, zero = mask.bool(), torch.zeros_like(logp)
            logp, ref = torch.where(keep, logp, zero), torch.where(keep, ref, zero)
        return k3_kl(logp, ref)
    if estimator == "gaussian":
        if reference.mean is None or reference.ref_mean is None or reference.std is None:
            raise ValueError("kl_estimator=gaussian needs the policy's Gaussian means and std; "
                             "the policy returned none (use k3)")
        return gaussian_step_kl(reference.mean, reference.ref_mean, reference.std, reference.event_mask)
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {KL_ESTIMATORS}")


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """``sum(values * mask)`` as a 0-d tensor; values off the mask (even NaN or inf) never count."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def aggregate_loss(per_pair: Tensor, mask: Tensor, seq_tokens: Tensor, counts: "BatchCounts", loss_type: str) -> Tensor:
    """The loss of one micro-batch and step chunk from per-pair losses ``L`` on the mask ``M``.

    Each type divides by a count of the whole optimizer step (:class:`BatchCounts`), so the
    chunks of a step sum to the step's loss (and their gradients to its gradient):

    - ``grpo``: ``(1 / sequences) sum_i sum_t L M / n_i`` (mean over sequences of their token mean);
    - ``bnpo``: ``sum L M / tokens`` (token mean over this rank's step);
    - ``dr_grpo``: ``sum L M / (samples * max_steps)`` (constant normaliser);
    - ``dapo``: ``sum L M / (global_tokens / world_size)``; DDP's gradient average over ranks then
      gives the token mean over the whole generation batch.

    Args:
        per_pair: ``[b, t]``.
        mask: ``[b, t]`` bool, trained pairs.
        seq_tokens: ``[b]`` trained steps of each sample over all ``T`` steps (``n_i``).
        counts: the :class:`~elign.engine.strategies.base.BatchCounts` of the optimizer step.
        loss_type: one of :data:`LOSS_TYPES`.

    Returns:
        0-d loss.
    """
    masked = torch.where(mask.bool(), per_pair, torch.zeros_like(per_pair))
    if loss_type == "grpo":
        per_seq = masked.sum(dim=-1) / seq_tokens.to(per_pair.dtype).clamp(min=1.0)
        return per_seq.sum() / max(counts.sequences, 1.0)
    if loss_type == "bnpo":
        return masked.sum() / max(counts.tokens, 1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / max(counts.samples * counts.max_steps, 1.0)
    if loss_type == "dapo":
        return masked.sum() / (max(counts.global_tokens, 1.0) / counts.world_size)
    raise ValueError(f"unknown loss type {loss_type!r}; allowed: {LOSS_TYPES}")


def pair_sums(mask: Tensor, dtype: torch.dtype, **values: Tensor | None) -> dict[str, Tensor]:
    """Detached sums over the trained pairs: ``count`` and each of ``values`` (``[b, t]``; None
    entries are left out). The trainer divides them by ``count`` into ``train/*`` means."""
    m = mask.to(dtype)
    sums = {"count": m.sum().detach()}
    for key, value in values.items():
        if value is not None:
            sums[key] = masked_sum(value.detach().to(dtype), m)
    return sums


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
