import math

import numpy as np
import pytest

from molgen_grpo.reward_math import (
    coverage_credit,
    hard_matching,
    legacy_match_term,
    legacy_rmsd_term,
    quality,
    smooth_coverage,
    soft_coverage,
    soft_hits,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_soft_hits_are_one_half_at_the_threshold_and_zero_for_inf():
    hits = soft_hits(np.array([[0.75, np.inf, 0.75 - 0.07]]), delta=0.75, rho=0.07)
    np.testing.assert_allclose(hits, [[0.5, 0.0, sigmoid(1.0)]])


def test_shapley_credit_of_two_rollouts_hand_computed():
    hits = np.array([[0.5], [0.2]])
    # phi_1 = a (1 - b / 2), phi_2 = b (1 - a / 2); they sum to 1 - (1 - a)(1 - b)
    np.testing.assert_allclose(coverage_credit(hits, "shapley"), [[0.5 * 0.9], [0.2 * 0.75]])
    np.testing.assert_allclose(soft_coverage(hits), [0.6])


def test_duplicates_share_a_reference_under_shapley_and_earn_nothing_under_leave_one_out():
    hits = np.ones((3, 1))
    np.testing.assert_allclose(coverage_credit(hits, "shapley"), np.full((3, 1), 1 / 3))
    np.testing.assert_allclose(coverage_credit(hits, "leave_one_out"), np.zeros((3, 1)))


def test_leave_one_out_hand_computed():
    hits = np.array([[0.5, 1.0], [0.2, 0.0]])
    np.testing.assert_allclose(coverage_credit(hits, "leave_one_out"), [[0.5 * 0.8, 1.0], [0.2 * 0.5, 0.0]])


def test_a_single_rollout_gets_its_hit():
    hits = np.array([[0.3, 0.9]])
    for credit in ("shapley", "leave_one_out"):
        np.testing.assert_allclose(coverage_credit(hits, credit), hits)


@pytest.mark.parametrize("k", [1, 2, 5, 16, 33])
def test_shapley_credit_sums_to_the_soft_coverage(k):
    rng = np.random.default_rng(k)
    hits = rng.uniform(size=(k, 30)) * (rng.uniform(size=(k, 30)) < 0.6)
    hits[0, 0] = 1.0  # an exact hit: no division by 1 - H anywhere
    np.testing.assert_allclose(coverage_credit(hits).sum(axis=0), soft_coverage(hits), rtol=0, atol=1e-12)
    loo = coverage_credit(hits, "leave_one_out").sum(axis=0)
    assert (loo <= soft_coverage(hits) + 1e-12).all()


def test_without_shaping_the_group_reward_sums_to_the_mean_soft_coverage():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.0, 2.0, size=(8, 5))
    d[3] = np.inf  # RDKit refused every alignment
    valid = np.ones(8, dtype=bool)
    valid[5] = False  # failed a gate: hits nothing, earns nothing
    r, c = smooth_coverage(d, valid, delta=0.75, rho=0.1)
    assert r[3] == 0 and r[5] == 0
    np.testing.assert_allclose(r.sum(), c.mean(), rtol=0, atol=1e-12)
    d_valid_only = np.where(valid[:, None], d, np.inf)
    np.testing.assert_allclose(c, soft_coverage(soft_hits(d_valid_only, 0.75, 0.1)))


def test_depth_and_precision_shaping_hand_computed():
    delta, rho = 0.75, 0.07
    d = np.array([[0.25, np.inf]])
    r, _ = smooth_coverage(d, np.array([True]), delta, rho, depth_weight=0.2, precision_weight=0.08)
    hit = sigmoid(0.5 / rho)
    depth = 1 + 0.2 * (1 - 0.25 / 0.75)
    np.testing.assert_allclose(r, [(hit * depth + 0.0) / 2 + 0.08 * hit])


def test_quality_hand_computed():
    d = np.array([[0.3, 0.6], [np.inf, np.inf], [0.1, 0.2]])
    q = quality(d, np.array([True, True, False]), sigma=0.3)
    np.testing.assert_allclose(q, [math.exp(-1.0), 0.0, 0.0])


def test_hard_matching_prefers_more_pairs_to_a_greedy_nearest():
    d = np.array([[0.1, 0.2], [0.15, 0.9]])
    r, pairs = hard_matching(d, np.array([True, True]), delta=0.75)
    assert pairs == [(0, 1), (1, 0)]  # greedy (0, 0) would leave rollout 1 unmatched
    np.testing.assert_allclose(r, [1 - 0.2 / 0.75, 1 - 0.15 / 0.75])


def test_hard_matching_pads_more_rollouts_than_references_and_skips_invalid():
    d = np.array([[0.5], [0.2], [0.05]])
    r, pairs = hard_matching(d, np.array([True, True, False]), delta=0.75)
    assert pairs == [(1, 0)]
    np.testing.assert_allclose(r, [0.0, 1 - 0.2 / 0.75, 0.0])
    r, pairs = hard_matching(np.full((2, 2), 0.8), np.ones(2, dtype=bool), delta=0.75)
    assert pairs == [] and not r.any()


def test_legacy_terms_hand_computed():
    np.testing.assert_allclose(legacy_rmsd_term(np.array([0.0, 0.75, np.inf])), [1.0, 0.5, 0.0])
    assert legacy_match_term("CCO", "CCO") == 1.0
    assert legacy_match_term("CCN", "CCO") == pytest.approx(2 / 3)
    assert legacy_match_term("C", "CCO") == pytest.approx(1 / 3)  # positions beyond the shorter string disagree
    assert legacy_match_term("", "CCO") == 0.0
