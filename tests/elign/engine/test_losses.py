import math

import pytest
import torch

from elign.engine.losses import (
    LOSS_TYPES,
    aggregate_loss,
    clipped_objective,
    clipped_surrogate,
    gaussian_kl_same_std,
    gaussian_step_kl,
    importance_weights,
    k3_kl,
    per_sample_coefficients,
    reference_kl,
)
from elign.engine.rollout import StepLogProbs
from elign.engine.strategies.base import BatchCounts


def test_clipped_surrogate_hand_computed():
    ratio = torch.tensor([[1.5, 0.5, 1.01]])
    logp_old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, r, clipped = clipped_surrogate(ratio.log(), logp_old, adv, clip_range=0.2)
    # max(-A*rho, -A*clip(rho)): (-1.5 vs -1.2) -> -1.2; (-0.5 vs -0.8) -> -0.5; (1.01 vs 1.01)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5, 1.01]]))
    torch.testing.assert_close(r, ratio)
    assert clipped.tolist() == [[True, True, False]]


def test_clipped_surrogate_gradient_vanishes_when_clipped_in_advantage_direction():
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, _, _ = clipped_surrogate(logp, torch.zeros(1, 1), torch.ones(1, 1), 0.2)
    loss.sum().backward()
    assert logp.grad.item() == 0.0


def _old_clipped_surrogate(logp, logp_old, advantages, clip_range):
    """The formula FED-GRPO used before the loss pieces were shared (kept verbatim)."""
    ratio = torch.exp(logp - logp_old)
    unclipped = -advantages * ratio
    clipped_obj = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped_obj)
    clipped = (ratio.detach() - 1.0).abs() > clip_range
    return loss, ratio, clipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_surrogate_is_bitwise_the_old_formula(dtype):
    g = torch.Generator().manual_seed(3)
    logp_old = torch.randn(64, 33, generator=g, dtype=dtype)
    logp = logp_old + 0.3 * torch.randn(64, 33, generator=g, dtype=dtype)
    logp[:8] = logp_old[:8]  # ratio exactly 1: ties between the clipped and unclipped branches
    adv = torch.randn(64, 33, generator=g, dtype=dtype)
    adv[:, :3] = 0.0
    adv[:, 3] = -0.0
    for eps in (0.2, 2e-3):
        a = logp.clone().requires_grad_(True)
        b = logp.clone().requires_grad_(True)
        new = clipped_surrogate(a, logp_old, adv, eps)
        old = _old_clipped_surrogate(b, logp_old, adv, eps)
        for x, y in zip(new, old):
            assert torch.equal(x, y)
        weights = torch.randn(64, 33, generator=g, dtype=dtype)
        (new[0] * weights).sum().backward()
        (old[0] * weights).sum().backward()
        assert torch.equal(a.grad, b.grad)


def test_importance_weights_per_token_and_masked_padding():
    logp = torch.tensor([[0.0, math.log(2.0)], [math.log(0.5), -math.inf]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    rho = importance_weights(logp, torch.zeros(2, 2), mask)
    torch.testing.assert_close(rho, torch.tensor([[1.0, 2.0], [0.5, 1.0]]))
    rho.sum().backward()  # a -inf log-prob off the mask must not reach the gradient
    torch.testing.assert_close(logp.grad, torch.tensor([[1.0, 2.0], [0.5, 0.0]]))


def test_importance_weights_per_sequence_is_the_mean_log_ratio_broadcast():
    logp = torch.tensor([[0.2, 0.4, 9.0], [0.0, -0.6, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    s = importance_weights(logp, torch.zeros(2, 3), mask, "sequence")
    e1, e2 = math.exp(0.3), math.exp(-0.2)  # (0.2 + 0.4) / 2 and (0 - 0.6 + 0) / 3
    torch.testing.assert_close(s, torch.tensor([[e1] * 3, [e2] * 3]))
    s[:, 0].sum().backward()  # d s_i / d logp_it = s_i M_it / n_i
    torch.testing.assert_close(logp.grad, torch.tensor([[e1 / 2, e1 / 2, 0.0], [e2 / 3] * 3]))


def test_importance_weights_per_sequence_uses_given_token_counts():
    logp = torch.tensor([[0.2, 0.4]])
    s = importance_weights(logp, torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), "sequence",
                           seq_tokens=torch.tensor([4]))
    torch.testing.assert_close(s, torch.full((1, 2), math.exp(0.6 / 4)))


def test_clipped_objective_asymmetric_clip_and_indicators_hand_computed():
    ratio = torch.tensor([[0.7, 0.7, 1.3, 1.3, 1.25, 5.0]], requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0, 1.0, -1.0, 2.0, -1.0]])
    loss, low, high = clipped_objective(ratio, adv, 0.2, 0.28)
    # -min(rho A, clip(rho, 0.8, 1.28) A) per column
    torch.testing.assert_close(loss, torch.tensor([[0.8, -0.7, -1.28, 1.3, -2.5, 5.0]]))
    assert low.tolist() == [[True, False, False, False, False, False]]
    assert high.tolist() == [[False, False, True, False, False, False]]
    loss.sum().backward()
    torch.testing.assert_close(ratio.grad, torch.tensor([[0.0, -1.0, 0.0, 1.0, -2.0, 1.0]]))


def test_clipped_objective_delta_caps_the_unclipped_ratio():
    ratio = torch.tensor([[5.0, 2.0, 1.3]], requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, low, high = clipped_objective(ratio, adv, 0.2, 0.28, delta=3.0)
    # rho' = min(rho, 3): -min(-3, -1.28) = 3; -min(-2, -1.28) = 2; -min(1.3, 1.28) = -1.28
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0, -1.28]]))
    assert high.tolist() == [[False, False, True]] and not low.any()
    loss.sum().backward()
    torch.testing.assert_close(ratio.grad, torch.tensor([[0.0, 1.0, 0.0]]))  # capped: no gradient


def counts(**kw) -> BatchCounts:
    base = dict(tokens=3.0, sequences=2.0, samples=2.0, global_tokens=14.0, global_sequences=4.0,
                world_size=4, max_steps=3)
    base.update(kw)
    return BatchCounts(**base)


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", (3.0 / 2 + 4.0 / 1) / 2),  # mean over the 2 sequences of their token means
    ("bnpo", 7.0 / 3),  # masked sum 1 + 2 + 4 over 3 tokens
    ("dr_grpo", 7.0 / (2 * 3)),  # over samples * max_steps
    ("dapo", 7.0 / (14.0 / 4)),  # over the global tokens per rank
])
def test_aggregate_loss_hand_computed(loss_type, expected):
    per_pair = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, math.nan]])  # NaN off the mask is ignored
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = aggregate_loss(per_pair, mask, torch.tensor([2, 1]), counts(), loss_type)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def _toy_loss(theta, adv, mask, seq_tokens, c, loss_type):
    ratio = importance_weights(theta, torch.zeros_like(theta), mask)
    per_pair, _, _ = clipped_objective(ratio, adv, 0.2, 0.28)
    return aggregate_loss(per_pair, mask, seq_tokens, c, loss_type)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_aggregate_loss_micro_batches_and_chunks_add_up_to_the_batch(loss_type):
    g = torch.Generator().manual_seed(0)
    b, t = 6, 7
    theta0 = 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[4] = False  # a sample without a trained step
    mask[0, 0] = True
    seq_tokens = mask.sum(dim=1)
    c = BatchCounts(tokens=float(mask.sum()), sequences=float(mask.any(dim=1).sum()), samples=float(b),
                    global_tokens=float(mask.sum()), global_sequences=float(mask.any(dim=1).sum()),
                    world_size=1, max_steps=t)
    whole_theta = theta0.clone().requires_grad_(True)
    whole = _toy_loss(whole_theta, adv, mask, seq_tokens, c, loss_type)
    whole.backward()

    theta = theta0.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for rows in torch.arange(b).split(4):  # micro-batches of samples
        for cols in torch.arange(t).split(3):  # chunks of steps
            sub = theta[rows][:, cols]
            part = _toy_loss(sub, adv[rows][:, cols], mask[rows][:, cols], seq_tokens[rows], c, loss_type)
            part.backward()
            total = total + part.detach()
    torch.testing.assert_close(total, whole.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(theta.grad, whole_theta.grad, rtol=1e-12, atol=1e-14)

    # The definitions, written out from the per-pair losses of the whole batch.
    per_pair = clipped_objective(torch.exp(theta0), adv, 0.2, 0.28)[0]
    rows = [per_pair[i][mask[i]] for i in range(b)]
    expected = {
        "grpo": sum(r.mean() for r in rows if r.numel()) / sum(1 for r in rows if r.numel()),
        "bnpo": per_pair[mask].mean(),
        "dr_grpo": per_pair[mask].sum() / (b * t),
        "dapo": per_pair[mask].mean(),
    }[loss_type]
    torch.testing.assert_close(whole.detach(), expected, rtol=1e-12, atol=1e-14)


def test_dapo_rank_losses_average_to_the_global_token_mean():
    g = torch.Generator().manual_seed(1)
    per_pair = torch.randn(8, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(8, 5, generator=g) < 0.6
    ranks = [slice(0, 3), slice(3, 8)]  # unequal token counts per rank
    total_tokens = float(mask.sum())
    losses = []
    for r in ranks:
        c = counts(tokens=float(mask[r].sum()), global_tokens=total_tokens, world_size=2)
        losses.append(aggregate_loss(per_pair[r], mask[r], mask[r].sum(1), c, "dapo"))
    # DDP averages over ranks: (l0 + l1) / 2 is the token mean over both ranks.
    torch.testing.assert_close((losses[0] + losses[1]) / 2, per_pair[mask].mean())


def test_k3_hand_computed():
    logp = torch.tensor([[0.0, -1.0]])
    ref = torch.tensor([[math.log(2.0), -1.0]])
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([[2.0 - math.log(2.0) - 1.0, 0.0]]))


def test_k3_is_unbiased_for_the_kl_of_two_categoricals():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)  # 0.2238
    x = torch.multinomial(p, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = k3_kl(p.log()[x], q.log()[x]).mean().item()
    assert estimate == pytest.approx(exact, rel=0.02)
    assert (k3_kl(p.log()[x], q.log()[x]) >= 0).all()


def test_gaussian_step_kl_hand_computed():
    mean = torch.tensor([[[1.0, 0.0], [2.0, 5.0]]])  # [b=1, t=2, 2]
    ref = torch.zeros(1, 2, 2)
    std = torch.tensor([[1.0, 0.5]])
    event = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])  # step 1's second dimension does not exist
    # |1|^2 / (2 * 1) = 0.5 ; |2|^2 / (2 * 0.25) = 8
    torch.testing.assert_close(gaussian_step_kl(mean, ref, std, event), torch.tensor([[0.5, 8.0]]))
    torch.testing.assert_close(gaussian_step_kl(mean, ref, std), torch.tensor([[0.5, 58.0]]))


def test_reference_kl_picks_the_estimator_and_names_what_is_missing():
    logp = torch.zeros(1, 1)
    ref = StepLogProbs(logp=logp, ref_logp=torch.tensor([[math.log(2.0)]]))
    torch.testing.assert_close(reference_kl(ref, logp, "k3"), torch.tensor([[1.0 - math.log(2.0)]]))
    with pytest.raises(ValueError, match="gaussian"):
        reference_kl(ref, logp, "gaussian")
    with pytest.raises(ValueError, match="k3"):
        reference_kl(StepLogProbs(logp=logp), logp, "k3")


def test_gaussian_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mean_p, mean_q = torch.randn(2, 5), torch.randn(2, 5)
    std = torch.tensor([0.7, 1.3])
    mask = torch.ones(2, 5)
    closed = gaussian_kl_same_std(mean_p, mean_q, std, mask)
    x = mean_p + std[:, None] * torch.randn(200_000, 2, 5)
    p = torch.distributions.Normal(mean_p, std[:, None])
    q = torch.distributions.Normal(mean_q, std[:, None])
    mc = (p.log_prob(x) - q.log_prob(x)).sum(-1).mean(0)
    torch.testing.assert_close(closed, mc, rtol=0.03, atol=0.02)


def test_gaussian_kl_respects_mask():
    kl = gaussian_kl_same_std(torch.ones(1, 3), torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1.0, 0.0, 1.0]]))
    torch.testing.assert_close(kl, torch.tensor([1.0]))


def test_per_sample_coefficients_hand_computed():
    mask = torch.tensor([[False, True, True], [True, True, True], [False, False, False]])
    coef = torch.tensor([[0.0, -0.5, -0.5], [0.25, 0.25, 0.25], [0.0, 0.0, 0.0]])
    assert per_sample_coefficients(coef, mask).tolist() == [-0.5, 0.25, 0.0]
    # A value off the mask does not count; one that differs on it is per-step weighting.
    assert per_sample_coefficients(coef + torch.tensor([[9.0, 0, 0], [0, 0, 0], [0, 0, 0]]), mask).tolist() == [-0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="per-step advantages"):
        per_sample_coefficients(coef + torch.tensor([[0, 0, 0.1], [0, 0, 0], [0, 0, 0]]), mask)
