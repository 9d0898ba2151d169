"""Group-relative advantages: pure functions over tensors.

``B`` samples, ``T`` steps. Groups are given by integer ids ``[B]``; statistics use the population
standard deviation (``unbiased=False``). A group with one member, or whose members are all equal,
has zero spread: its advantages are exactly 0 (never NaN, never ±1/eps from round-off).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense ``[B]`` index 0..G-1 for arbitrary group ids, and G."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


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
    count = torch.zeros(g, 1, dtype=v.dtype, device=v.device).index_add_(0, idx, w)
    total = torch.zeros(g, v.shape[1], dtype=v.dtype, device=v.device).index_add_(0, idx, v * w)
    mean = total / count.clamp_min(1)
    centred = (v - mean[idx]) * w
    var = torch.zeros_like(total).index_add_(0, idx, centred**2) / count.clamp_min(1)
    std = var.sqrt()[idx]
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
