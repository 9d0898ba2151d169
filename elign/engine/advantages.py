"""Group-relative advantages: pure functions over tensors.

``B`` samples, ``T`` steps, ``K`` reward functions (channels). Groups are given by integer ids
``[B]`` (any values; samples of a group need not be consecutive).

Two families:

- FED-GRPO (:func:`group_normalize`, :func:`fed_advantages`): each channel is normalised on its own
  with the population standard deviation (``unbiased=False``); a group with one member, or whose
  members are all equal, has zero spread and gets advantages of exactly 0.
- TRL's GRPO (:func:`grpo_advantages`): rewards may be NaN (a function that did not score a
  sample); statistics skip NaN and use Bessel's correction; ``A = (r - mean) / (std + eps)``; NaN
  advantages become 0. A zero-spread group also gets exactly 0 (TRL's ``0 / (0 + eps)``, without
  its round-off residue).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense ``[B]`` index 0..G-1 for arbitrary group ids, and G."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def _group_moments(v: Tensor, w: Tensor, idx: Tensor, g: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weighted moments of ``v`` ``[B, C]`` per group, over the rows (entries) with weight 1.

    Args:
        v: ``[B, C]`` finite values.
        w: ``[B, 1]`` or ``[B, C]`` weights, 0 or 1.
        idx: ``[B]`` dense group index (:func:`_group_index`); ``g`` groups.

    Returns:
        ``(count [G, 1 or C], mean [G, C], centred [B, C], squares [G, C])``: ``centred`` is
        ``(v - mean) * w`` and ``squares`` the per-group sum of its squares. An empty group has mean 0.
    """
    count = torch.zeros(g, w.shape[1], dtype=v.dtype, device=v.device).index_add_(0, idx, w)
    total = torch.zeros(g, v.shape[1], dtype=v.dtype, device=v.device).index_add_(0, idx, v * w)
    mean = total / count.clamp_min(1)
    centred = (v - mean[idx]) * w
    squares = torch.zeros_like(total).index_add_(0, idx, centred**2)
    return count, mean, centred, squares


def group_normalize(values: Tensor, group_ids: Tensor, keep: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """``(v - mean_g) / (std_g + eps)`` within each group.

    Args:
        values: ``[B]`` or ``[B, T]``; a ``[B, T]`` input is normalised column by column
            (each step over the members of its group).
        group_ids: ``[B]`` group of each sample.
        keep: ``[B]`` bool; samples set False neither enter the statistics nor get an advantage (0).
        eps: added to the standard deviation.

    Returns:
        Same shape as ``values``. Groups (per column) with zero spread get 0.
    """
    squeeze = values.dim() == 1
    v = values.unsqueeze(1) if squeeze else values
    v = v.double()  # statistics in float64: rewards like -1e4 + small differences lose bits in fp32
    k = torch.ones(v.shape[0], dtype=torch.bool, device=v.device) if keep is None else keep.bool()
    idx, g = _group_index(group_ids)
    w = k.to(v.dtype).unsqueeze(1)  # [B, 1]
    count, _, centred, squares = _group_moments(v, w, idx, g)
    std = (squares / count.clamp_min(1)).sqrt()[idx]
    # Zero spread means "no preference inside this group": advantage exactly 0.
    adv = torch.where(std > eps, centred / (std + eps), torch.zeros_like(centred)) * w
    adv = adv.to(values.dtype)
    return adv.squeeze(1) if squeeze else adv


def pbrs_return_to_go(potentials: Tensor, terminal: Tensor, evaluated: Tensor, gamma: float = 1.0) -> Tensor:
    """Potential-based return-to-go of the ELIGN paper (Eq. 4): ``G_j = gamma^(T-j) * Psi_T - Psi_j``.

    Column ``j`` is the ``j``-th recorded transition; ``Psi_j`` is the potential of the state it
    starts from (e.g. minus the energy of the clean sample predicted at that step) and ``Psi_T`` the
    potential of the final sample (the channel's terminal value). With ``gamma = 1`` this is
    the improvement still to come from step ``j`` to the end.

    Args:
        potentials: ``[B, T]`` potentials; read only where ``evaluated``.
        terminal: ``[B]`` terminal potential.
        evaluated: ``[T]`` bool, the steps at which potentials were computed.
        gamma: discount per step.

    Returns:
        ``[B, T]`` returns, 0 at steps that were not evaluated.
    """
    t = potentials.shape[1]
    remaining = torch.arange(t, 0, -1, device=potentials.device, dtype=potentials.dtype)  # T - j
    discount = torch.pow(torch.as_tensor(gamma, dtype=potentials.dtype), remaining)  # [T]
    returns = discount.unsqueeze(0) * terminal.unsqueeze(1) - potentials
    return torch.where(evaluated.unsqueeze(0), returns, torch.zeros_like(returns))


def fed_advantages(
    channels: dict[str, Tensor],
    weights: dict[str, float],
    group_ids: Tensor,
    num_steps: int,
    returns: dict[str, Tensor] | None = None,
    evaluated: Tensor | None = None,
    keep: Tensor | None = None,
    clip: float | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Disentangled (per-channel) group normalisation of FED-GRPO; plain GRPO is one channel.

    ``A = sum_c w_c * A_c`` with ``A_c`` the group-normalised channel ``c``, then clipped to
    ``[-clip, clip]``. A terminal channel gives one advantage per sample, broadcast over steps;
    a shaped channel (in ``returns``) is normalised per evaluated step and is 0 elsewhere.

    Args:
        channels: name -> ``[B]`` terminal rewards (failures already replaced by penalties).
        weights: name -> weight of the channel's normalised advantage.
        group_ids: ``[B]``.
        num_steps: T.
        returns: name -> ``[B, T]`` per-step returns for shaped channels (replace the terminal one).
        evaluated: ``[T]`` bool, columns of ``returns`` that carry a value.
        keep: ``[B]`` bool; dropped samples get advantage 0 and are not in the statistics.
        clip: symmetric clip of the combined advantage (None: no clipping).
        eps: standard-deviation epsilon.

    Returns:
        ``[B, T]`` advantages.
    """
    returns = returns or {}
    b = group_ids.shape[0]
    ref = next(iter(channels.values()))
    adv = torch.zeros(b, num_steps, dtype=ref.dtype, device=ref.device)
    for name, values in channels.items():
        w = weights[name]
        if w == 0.0:
            continue
        if name in returns:
            if evaluated is None:
                raise ValueError(f"channel {name!r} has returns but no `evaluated` step mask")
            per_step = group_normalize(returns[name], group_ids, keep, eps)
            adv = adv + w * per_step * evaluated.to(adv.dtype).unsqueeze(0)
        else:
            adv = adv + w * group_normalize(values, group_ids, keep, eps).unsqueeze(1)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def replace_failures(values: Tensor, penalty: float) -> tuple[Tensor, int]:
    """NaN (a failed evaluation) -> ``penalty``. Returns the new ``[B]`` values and the count."""
    failed = torch.isnan(values)
    return torch.where(failed, torch.full_like(values, penalty), values), int(failed.sum().item())


MULTI_REWARD = ("sum_then_normalize", "normalize_then_sum")
SCALE_REWARDS = ("group", "batch", "none")


def nan_moments(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """NaN-skipping group statistics, per sample (TRL's ``nanmean`` / ``nanstd``).

    Args:
        values: ``[B]``; NaN entries are left out.
        group_ids: ``[B]``; one id for all samples gives batch statistics.

    Returns:
        ``(mean [B], std [B], flat [B] bool)`` of each sample's group: the mean (0 for a group
        without values), the standard deviation with Bessel's correction (NaN for fewer than two
        values), and whether all its values are equal (False for a group without values).
    """
    idx, g = _group_index(group_ids)
    valid = ~torch.isnan(values)
    v = torch.where(valid, values, torch.zeros_like(values)).unsqueeze(1)
    count, mean, _, squares = _group_moments(v, valid.to(values.dtype).unsqueeze(1), idx, g)
    std = torch.where(count > 1, squares / (count - 1), torch.full_like(squares, math.nan)).sqrt()
    inf = torch.full((g,), math.inf, dtype=values.dtype, device=values.device)
    low = inf.scatter_reduce(0, idx, torch.where(valid, values, inf[idx]), "amin")
    high = (-inf).scatter_reduce(0, idx, torch.where(valid, values, -inf[idx]), "amax")
    return mean[idx, 0], std[idx, 0], (low == high)[idx]


def nan_weighted_sum(rewards: Tensor, weights: Tensor) -> Tensor:
    """``sum_k w_k r_k`` skipping NaN terms; a row whose every reward is NaN is NaN.

    Args:
        rewards: ``[B, K]``.
        weights: ``[K]``.

    Returns:
        ``[B]``.
    """
    total = (rewards * weights.unsqueeze(0)).nansum(dim=1)
    return torch.where(torch.isnan(rewards).all(dim=1), torch.full_like(total, math.nan), total)


def _zscore(values: Tensor, mean: Tensor, std: Tensor | None, flat: Tensor, eps: float) -> Tensor:
    """``(v - mean) / (std + eps)`` (no division when ``std`` is None); exactly 0 where ``flat``
    (NaN values stay NaN)."""
    centred = torch.where(flat & ~torch.isnan(values), torch.zeros_like(values), values - mean)
    return centred if std is None else centred / (std + eps)


def sum_then_normalize(rewards: Tensor, weights: Tensor, group_ids: Tensor, scale_rewards: str = "group",
                       eps: float = 1e-4) -> Tensor:
    """TRL's default: ``r = sum_k w_k r_k`` (NaN-skipping), ``A = (r - mean_group(r)) / (std + eps)``.

    Args:
        rewards: ``[B, K]``, NaN where a function gave no reward.
        weights: ``[K]``.
        group_ids: ``[B]``.
        scale_rewards: ``group`` (std of the group), ``batch`` (std of the whole batch, LitePPO)
            or ``none`` (no division, Dr. GRPO). The baseline is always the group mean.
        eps: added to the std.

    Returns:
        ``[B]``; NaN for a row without a reward or a group without a std (fewer than two values).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; allowed: {SCALE_REWARDS}")
    total = nan_weighted_sum(rewards, weights)
    mean, std, flat = nan_moments(total, group_ids)
    if scale_rewards == "batch":
        _, std, _ = nan_moments(total, torch.zeros_like(group_ids))
    return _zscore(total, mean, None if scale_rewards == "none" else std, flat, eps)


def normalize_then_sum(rewards: Tensor, weights: Tensor, group_ids: Tensor, eps: float = 1e-4) -> Tensor:
    """GDPO: z-score each reward within its group, take the NaN-skipping weighted sum, then z-score
    the sums over the batch.

    Args:
        rewards: ``[B, K]``, NaN where a function gave no reward.
        weights: ``[K]``.
        group_ids: ``[B]``.
        eps: added to each std.

    Returns:
        ``[B]``; NaN for a row without a reward. A reward whose group has fewer than two values
        has no z-score and is skipped in the sum.
    """
    scores = []
    for k in range(rewards.shape[1]):
        mean, std, flat = nan_moments(rewards[:, k], group_ids)
        scores.append(_zscore(rewards[:, k], mean, std, flat, eps))
    # A score that is NaN (no reward, or a group without a std) is skipped; only a row without any
    # reward is NaN (a row whose rewards all lack a z-score sums to 0, as in TRL).
    total = (torch.stack(scores, dim=1) * weights.unsqueeze(0)).nansum(dim=1)
    total = torch.where(torch.isnan(rewards).all(dim=1), torch.full_like(total, math.nan), total)
    mean, std, flat = nan_moments(total, torch.zeros_like(group_ids))
    return _zscore(total, mean, std, flat, eps)


def grpo_advantages(
    rewards: Tensor,
    weights: Tensor,
    group_ids: Tensor,
    keep: Tensor | None = None,
    multi_reward: str = "sum_then_normalize",
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> Tensor:
    """TRL's GRPO advantages (``GRPOTrainer._generate_and_score_completions``).

    Args:
        rewards: ``[B, K]`` rewards of ``K`` functions, NaN where a function gave none.
        weights: ``[K]``.
        group_ids: ``[B]``.
        keep: ``[B]`` bool; dropped samples are left out of every statistic and get 0.
        multi_reward: ``sum_then_normalize`` or ``normalize_then_sum`` (GDPO; ``scale_rewards``
            does not apply, its last step is a batch z-score).
        scale_rewards: see :func:`sum_then_normalize`.
        eps: added to every std.

    Returns:
        ``[B]`` advantages, never NaN (TRL's NaN -> 0).
    """
    rewards = rewards.double()  # statistics in float64, as for FED-GRPO
    if keep is not None:
        rewards = torch.where(keep.bool().unsqueeze(1), rewards, torch.full_like(rewards, math.nan))
    weights = weights.to(rewards)
    if multi_reward == "sum_then_normalize":
        adv = sum_then_normalize(rewards, weights, group_ids, scale_rewards, eps)
    elif multi_reward == "normalize_then_sum":
        adv = normalize_then_sum(rewards, weights, group_ids, eps)
    else:
        raise ValueError(f"unknown multi_reward {multi_reward!r}; allowed: {MULTI_REWARD}")
    return torch.nan_to_num(adv, nan=0.0)
