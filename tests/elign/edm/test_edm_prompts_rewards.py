"""NodeCountPrompts (histogram, focus, errors) and CompactnessReward (hand-computed cases)."""

from __future__ import annotations

import math

import pytest
import torch

from elign.edm.prompts import QM9_NODE_COUNTS, NodeCountPrompts
from elign.edm.rewards import CompactnessReward
from elign.engine.errors import ConfigError
from elign.engine.rollout import PromptSource, Reward, Rollout


def test_qm9_histogram_facts() -> None:
    assert list(QM9_NODE_COUNTS)[:4] == [22, 17, 23, 21] and list(QM9_NODE_COUNTS)[-1] == 3
    assert sum(QM9_NODE_COUNTS.values()) == 100_000
    mean = sum(n * c for n, c in QM9_NODE_COUNTS.items()) / 100_000
    assert mean == pytest.approx(18.03, abs=0.01)
    assert 28 not in QM9_NODE_COUNTS and max(QM9_NODE_COUNTS) == 29


def test_prompts_follow_histogram_and_are_seeded() -> None:
    prompts = NodeCountPrompts(batch_size=40_000, group_size=2)
    assert isinstance(prompts, PromptSource) and iter(prompts) is prompts
    torch.manual_seed(0)
    draw = next(prompts)
    assert draw.dtype == torch.long and draw.shape == (20_000,)
    freq = torch.bincount(draw, minlength=30).double() / draw.numel()
    expected = torch.zeros(30, dtype=torch.float64)
    for n, c in QM9_NODE_COUNTS.items():
        expected[n] = c / 100_000
    assert (freq - expected).abs().max() < 0.01
    assert freq[28] == 0
    torch.manual_seed(0)
    assert torch.equal(next(prompts), draw)  # global RNG: the trainer's reseed reproduces draws


def test_focus_reweights_range() -> None:
    prompts = NodeCountPrompts(batch_size=8, group_size=4, focus_min=10, focus_max=12, focus_factor=10.0)
    inside = sum(c for n, c in QM9_NODE_COUNTS.items() if 10 <= n <= 12)
    expected = 10 * inside / (100_000 + 9 * inside)
    got = prompts.probs[(prompts.node_counts >= 10) & (prompts.node_counts <= 12)].sum().item()
    assert got == pytest.approx(expected, rel=1e-9)
    assert next(prompts).shape == (2,)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"batch_size": 6, "group_size": 4}, "batch_size"),
        ({"batch_size": 0, "group_size": 4}, "batch_size"),
        ({"batch_size": 8, "group_size": 0}, "group_size"),
        ({"batch_size": 8, "group_size": 4, "histogram": "geom"}, "histogram"),
        ({"batch_size": 8, "group_size": 4, "focus_min": 5, "focus_factor": 0.0}, "focus_factor"),
        ({"batch_size": 8, "group_size": 4, "focus_min": 12, "focus_max": 10}, "focus_min"),
    ],
)
def test_prompt_config_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        NodeCountPrompts(**kwargs)
    assert info.value.key == key
    if key == "batch_size":
        assert "multiple of group_size=4" in str(info.value)


def _rollout(positions: torch.Tensor, mask: torch.Tensor) -> Rollout:
    b = positions.shape[0]
    return Rollout(
        group_ids=torch.arange(b),
        logp_old=torch.zeros(b, 1),
        step_mask=torch.ones(b, 1, dtype=torch.bool),
        payload={"positions": positions, "node_mask": mask},
    )


def test_compactness_hand_computed() -> None:
    pos = torch.zeros(2, 3, 3)
    pos[0, 0] = torch.tensor([0.0, 0.0, 0.0])
    pos[0, 1] = torch.tensor([2.0, 0.0, 0.0])  # centre (1, 0, 0): Rg = 1
    pos[0, 2] = float("nan")  # padding, must be ignored
    pos[1] = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    reward = CompactnessReward()
    assert isinstance(reward, Reward)
    out = reward(_rollout(pos, mask))
    # molecule 2: centre (1, 1, 0); squared distances 2, 5, 5 -> Rg = sqrt(4)
    torch.testing.assert_close(out.channels["compactness"], torch.tensor([-1.0, -2.0]))
    assert out.metrics["radius_of_gyration"] == pytest.approx(1.5)
    assert out.failures == {}


def test_compactness_nonfinite_sample_is_nan_and_counted() -> None:
    pos = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], [[float("inf"), 0.0, 0.0], [1.0, 0.0, 0.0]]])
    out = CompactnessReward()(_rollout(pos, torch.ones(2, 2, dtype=torch.bool)))
    assert out.channels["compactness"][0].item() == pytest.approx(-0.5)
    assert math.isnan(out.channels["compactness"][1].item())
    assert out.failures == {"nonfinite_positions": 1}
