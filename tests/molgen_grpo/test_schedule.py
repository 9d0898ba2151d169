"""WSDS learning-rate factors (spec §1.5), computed by hand at every phase boundary."""

from __future__ import annotations

import pytest
import torch

from elign.engine.errors import ConfigError
from molgen_grpo.schedule import WSDSSchedule, decay_start, wsds_factor


def test_two_checkpoints_by_hand():
    # W = 4; T = 10: D = 3, decay from a = 7; T = 20: D = 6, decay from a = 14; m = 0.1
    f = [wsds_factor(s, 4, [10, 20], 0.3, 0.1) for s in range(22)]
    expected = [0.2, 0.4, 0.6, 0.8,  # warmup (s + 1) / 5
                1, 1, 1,  # stable
                1, 1 - 0.9 / 3, 1 - 0.9 * 2 / 3,  # decay to T = 10: 1, 0.7, 0.4
                1, 1, 1, 1,  # back at the peak after checkpoint 10
                1, 0.85, 0.7, 0.55, 0.4, 0.25,  # decay to T = 20: 1 - 0.9 k / 6
                0.1, 0.1]  # after the last checkpoint: the minimum
    assert f == pytest.approx(expected, abs=1e-12)
    assert wsds_factor(10 ** 6, 4, [10, 20], 0.3, 0.1) == 0.1


def test_spec_run_boundaries():
    # 500 warmup steps, checkpoints every 30k to 150k, 10 % decay to 0 (spec §1.5)
    ckpts = list(range(30_000, 150_001, 30_000))
    f = lambda s: wsds_factor(s, 500, ckpts, 0.1, 0.0)  # noqa: E731
    assert f(0) == pytest.approx(1 / 501) and f(499) == pytest.approx(500 / 501) and f(500) == 1
    assert f(26_999) == 1 and f(27_000) == 1 and f(29_999) == pytest.approx(1 / 3000)
    assert f(30_000) == 1  # straight back to the peak
    assert f(53_999) == 1 and f(54_000) == 1 and f(59_999) == pytest.approx(1 / 6000)
    assert f(149_999) == pytest.approx(1 / 15_000) and f(150_000) == 0 and f(200_000) == 0


def test_decay_window_is_clipped_by_warmup_and_rounded_down():
    assert decay_start(6, 4, 0.5) == 4  # T - D = 3 lies inside the warmup
    assert [wsds_factor(s, 4, [6], 0.5, 0.0) for s in (3, 4, 5, 6)] == pytest.approx([0.8, 1.0, 0.5, 0.0])
    assert decay_start(100, 0, 0.29) == 71  # 0.29 * 100 is 28.999... in floating point
    assert decay_start(5, 0, 0.01) == 4  # at least one decay step
    assert decay_start(50, 0, 0.0) == 50  # decay_frac 0: no decay, the LR drops to m at T
    assert [wsds_factor(s, 0, [3], 0.0, 0.2) for s in range(5)] == [1, 1, 1, 0.2, 0.2]


def test_schedule_object_drives_lambda_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=8e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WSDSSchedule(2, [6], decay_frac=0.5, min_lr_ratio=0.0).bind(100))
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warmup 1/3, 2/3; stable at s = 2; decay from a = 3: 1, 2/3, 1/3; then 0
    assert lrs == pytest.approx([8e-4 * x for x in (1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3, 0, 0)])
    assert WSDSSchedule(0, None, 0.5).bind(10).checkpoints == [10]  # null: one decay at the end


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="checkpoints"):
        WSDSSchedule(10, [30, 20])
    with pytest.raises(ConfigError, match="checkpoints"):
        WSDSSchedule(10, [10, 20])  # inside the warmup
    with pytest.raises(ConfigError, match="checkpoints"):
        WSDSSchedule(10, [])
    with pytest.raises(ConfigError, match="decay_frac"):
        WSDSSchedule(0, [10], decay_frac=1.5)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        WSDSSchedule(0, [10], min_lr_ratio=-0.1)
    with pytest.raises(RuntimeError, match="bind"):
        WSDSSchedule(0, None)(0)
