"""The rollout batch: per-sample and per-group payload under micro-batch selection."""

import pytest
import torch

from elign.engine.rollout import Rollout, StepLogProbs


def grouped(p=3, k=2, t=4):
    b = p * k
    return Rollout(group_ids=torch.arange(p).repeat_interleave(k), logp_old=torch.arange(b * t, dtype=torch.float).view(b, t),
                   step_mask=torch.ones(b, t, dtype=torch.bool), payload={"x": torch.arange(b)},
                   group_payload={"trunk": torch.tensor([[10.0], [20.0], [30.0]])})


def test_select_keeps_the_rows_of_the_groups_it_touches_and_renumbers():
    sub = grouped().select(torch.tensor([2, 3, 4, 5]))  # groups 1 and 2
    assert sub.group_ids.tolist() == [0, 0, 1, 1]
    assert sub.group_payload["trunk"].tolist() == [[20.0], [30.0]]
    assert sub.payload["x"].tolist() == [2, 3, 4, 5]
    # each sample still reads its own group's row
    assert sub.group_payload["trunk"][sub.group_ids].squeeze(1).tolist() == [20.0, 20.0, 30.0, 30.0]


def test_select_without_group_payload_keeps_group_ids():
    ro = Rollout(group_ids=torch.tensor([4, 4, 9, 9]), logp_old=torch.zeros(4, 2), step_mask=torch.ones(4, 2, dtype=torch.bool))
    assert ro.select(torch.tensor([1, 2])).group_ids.tolist() == [4, 9]


def test_group_payload_shapes_are_checked():
    with pytest.raises(ValueError, match="group_ids must lie in"):
        Rollout(group_ids=torch.tensor([0, 3]), logp_old=torch.zeros(2, 1), step_mask=torch.ones(2, 1, dtype=torch.bool),
                group_payload={"trunk": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="share their leading dim"):
        Rollout(group_ids=torch.tensor([0, 1]), logp_old=torch.zeros(2, 1), step_mask=torch.ones(2, 1, dtype=torch.bool),
                group_payload={"a": torch.zeros(2, 5), "b": torch.zeros(3)})


def test_gaussian_kl_of_step_log_probs_hand_computed():
    # one step, two dims, |mu - mu_ref|^2 = 1 + 4 on real dims, std 2: KL = 5 / (2 * 4); dim 3 is padding
    out = StepLogProbs(logp=torch.zeros(1, 1), mean=torch.tensor([[[1.0, 2.0, 9.0]]]), ref_mean=torch.zeros(1, 1, 3),
                       std=torch.tensor([[2.0]]), event_mask=torch.tensor([[[1.0, 1.0, 0.0]]]))
    torch.testing.assert_close(out.gaussian_kl(), torch.tensor([[5.0 / 8.0]]))
    with pytest.raises(ValueError, match="k3"):
        StepLogProbs(logp=torch.zeros(1, 1)).gaussian_kl()
