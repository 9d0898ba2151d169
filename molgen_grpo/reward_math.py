"""The maths of the conformer rewards (spec §1.6): pure functions over one prompt group's RMSD matrix.

Shapes: ``K`` rollouts of one prompt, ``M`` reference conformers of its molecule; ``D [K, M]`` holds
the RMSD (Å) of rollout ``i`` to reference ``j``, ``inf`` where the rollout is invalid or RDKit
refused the alignment; ``valid [K]`` marks the rollouts that passed every gate.

Smooth coverage. A soft hit ``H_ij = sigmoid((delta - D_ij) / rho)`` says how much rollout ``i``
covers reference ``j``; the group covers ``j`` softly by ``c_j = 1 - prod_i (1 - H_ij)``, whose mean
over ``j`` is the smooth counterpart of COV-R at ``delta``. How ``c_j`` is split among rollouts:

- ``shapley`` (default): the Shapley value of the coverage game ``S -> 1 - prod_{l in S}(1 - H_lj)``,
  ``phi_ij = H_ij * integral_0^1 prod_{l != i} (1 - t H_lj) dt`` (Owen's multilinear form), taken
  exactly by Gauss-Legendre quadrature (the integrand is a polynomial of degree ``K - 1``). It is
  symmetric in the rollouts and sums over them to ``c_j``, so the group's summed reward is the
  mean soft coverage.
- ``leave_one_out``: 3DMolGen's ``H_ij * prod_{l != i} (1 - H_lj)``, the coverage rollout ``i``
  adds to all the others. Its sum over the group is the probability that *exactly one* rollout
  covers ``j``, which is below ``c_j`` as soon as two rollouts overlap: with two rollouts that both
  hit a reference (``H = 1``) each gets 0 and the reference's coverage earns nothing. 3DMolGen's
  documentation claims the sum equals the soft coverage; it does not, hence the default.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import expit

CREDITS = ("shapley", "leave_one_out")
UNMATCHABLE = 1.0e6  # assignment cost of an edge at or beyond delta (never preferred to an eligible one)


def soft_hits(distances: np.ndarray, delta: float, rho: float) -> np.ndarray:
    """``[K, M]`` soft hits ``sigmoid((delta - D) / rho)``; 0 where ``D`` is ``inf``."""
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    return expit((delta - np.asarray(distances, dtype=np.float64)) / rho)


def soft_coverage(hits: np.ndarray) -> np.ndarray:
    """``[M]`` soft coverage of each reference by the group, ``1 - prod_i (1 - H_ij)``."""
    return 1.0 - np.prod(1.0 - hits, axis=0)


def _products_without_each(factors: np.ndarray) -> np.ndarray:
    """``out[..., i, j] = prod_{l != i} factors[..., l, j]`` by prefix and suffix products (no
    division, so a factor of exactly 0 is handled)."""
    ones = np.ones_like(factors[..., :1, :])
    prefix = np.cumprod(np.concatenate([ones, factors[..., :-1, :]], axis=-2), axis=-2)
    suffix = np.flip(np.cumprod(np.concatenate([ones, np.flip(factors, -2)[..., :-1, :]], axis=-2), axis=-2), -2)
    return prefix * suffix


def coverage_credit(hits: np.ndarray, credit: str = "shapley") -> np.ndarray:
    """``[K, M]`` share of reference ``j``'s soft coverage credited to rollout ``i``.

    Args:
        hits: ``[K, M]`` soft hits in [0, 1].
        credit: ``shapley`` (sums over ``i`` to :func:`soft_coverage`) or ``leave_one_out``.
    """
    if credit == "leave_one_out":
        return hits * _products_without_each(1.0 - hits)
    if credit != "shapley":
        raise ValueError(f"unknown credit {credit!r}; allowed: {CREDITS}")
    k = hits.shape[0]
    nodes, weights = np.polynomial.legendre.leggauss(max((k + 1) // 2, 1))  # exact to degree 2n - 1 >= K - 1
    t = (nodes + 1.0) / 2.0  # [n] on [0, 1]
    factors = 1.0 - t[:, None, None] * hits[None]  # [n, K, M]
    return hits * np.tensordot(weights / 2.0, _products_without_each(factors), axes=1)


def smooth_coverage(distances: np.ndarray, valid: np.ndarray, delta: float, rho: float, depth_weight: float = 0.0,
                    precision_weight: float = 0.0, credit: str = "shapley") -> tuple[np.ndarray, np.ndarray]:
    """Smooth marginal coverage reward of each rollout and the group's soft coverage per reference.

    ``r_i = mean_j credit_ij * (1 + w_depth * clip(1 - D_ij / delta, 0, 1)) + w_prec * sigmoid((delta - d_i) / rho)``
    with ``d_i = min_j D_ij``; 0 for invalid rollouts, which also hit nothing.

    Args:
        distances: ``[K, M]`` RMSD.
        valid: ``[K]`` bool.
        delta, rho: the soft threshold (Å) and its width (Å).
        depth_weight: ``w_uq``, extra credit for hits well inside ``delta``.
        precision_weight: ``w_prec``, credit for being near some reference at all.
        credit: how a reference's coverage is split (:func:`coverage_credit`).

    Returns:
        ``r [K]`` and ``c [M]`` (:func:`soft_coverage` of the valid rollouts). Without shaping
        (both weights 0) and with ``shapley`` credit, ``r.sum() == c.mean()``.
    """
    valid = np.asarray(valid, dtype=bool)
    d = np.where(valid[:, None], np.asarray(distances, dtype=np.float64), np.inf)
    hits = soft_hits(d, delta, rho)
    share = coverage_credit(hits, credit)
    depth = 1.0 + depth_weight * np.clip(1.0 - d / delta, 0.0, 1.0)
    reward = (share * depth).mean(axis=1)
    if precision_weight:
        reward = reward + precision_weight * expit((delta - d.min(axis=1, initial=np.inf)) / rho)
    return np.where(valid, reward, 0.0), soft_coverage(hits)


def quality(distances: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """``[K]`` ``exp(-min_j D_ij / sigma)`` for valid rollouts, 0 otherwise."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    d_min = np.asarray(distances, dtype=np.float64).min(axis=1, initial=np.inf)
    return np.where(np.asarray(valid, dtype=bool) & np.isfinite(d_min), np.exp(-d_min / sigma), 0.0)


def hard_matching(distances: np.ndarray, valid: np.ndarray, delta: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """One-to-one matching of rollouts to references under ``delta`` (Hungarian, SciPy).

    Eligible edges are ``D_ij < delta`` of valid rollouts; the assignment has the most matched pairs
    and, among those, the least summed RMSD. A matched rollout earns ``max(0, 1 - D_ij / delta)``.

    Returns:
        ``r [K]`` and the matched ``(i, j)`` pairs in rollout order.
    """
    d = np.asarray(distances, dtype=np.float64)
    k, m = d.shape
    eligible = np.asarray(valid, dtype=bool)[:, None] & (d < delta)
    reward = np.zeros(k)
    if not eligible.any():
        return reward, []
    size = max(k, m)
    cost = np.full((size, size), UNMATCHABLE)
    cost[:k, :m] = np.where(eligible, d, UNMATCHABLE)
    rows, cols = linear_sum_assignment(cost)
    pairs = [(int(i), int(j)) for i, j in zip(rows, cols) if i < k and j < m and eligible[i, j]]
    for i, j in pairs:
        reward[i] = max(0.0, 1.0 - d[i, j] / delta)
    return reward, pairs


def legacy_rmsd_term(rmsd_min: np.ndarray, scale: float = 0.75) -> np.ndarray:
    """3DMolGen's legacy RMSD term ``1 / (1 + d / scale)``; 0 for ``inf`` (no valid alignment)."""
    d = np.asarray(rmsd_min, dtype=np.float64)
    return np.where(np.isfinite(d), 1.0 / (1.0 + d / scale), 0.0)


def legacy_match_term(generated: str, target: str) -> float:
    """3DMolGen's legacy string match: 1 for identical strings, else the share of the target's
    positions whose character the generated string repeats at the same position."""
    if generated == target:
        return 1.0
    if not target:
        return 0.0
    return sum(a == b for a, b in zip(target, generated)) / len(target)
