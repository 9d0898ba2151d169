"""The Boltz GRPO recipe as a user runs it (``python run.py experiment=boltz/grpo``), in small jobs: the
acceptance report with the reward-spread checks, exact resume, and torchrun with two ranks (several denoiser
forwards per backward under DDP)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from test_job import RUN, _run, numbers, rows, torchrun_job

#: A small GRPO job: 24-token crops, 2 targets x 2 samples, 6 sampler steps (stochastic actions at t̂ = 1209 and
#: 231 Å: the last one trained, the group sharing the trajectory before it), evaluations of 1crn every 2 iterations.
SMALL = ["experiment=boltz/grpo", "dataloader.max_tokens=24", "dataloader.group_size=2", "dataloader.batch_size=4",
         "trainer.micro_batch_size=2", "model.sampling_steps=6", "model.max_action_noise_angstrom=300",
         "evaluator.sampling_steps=3",
         "evaluator.diffusion_samples=2", "evaluator.ids=[1crn]", "trainer.eval_interval=2", "trainer.save_interval=2",
         "acceptance.max_flat_group_frac=1.0", "trainer.progress=false"]


def job(run_dir: Path, *overrides: str) -> object:
    return _run([sys.executable, str(RUN), *SMALL, f"hydra.run.dir={run_dir}", *overrides], cwd=run_dir.parent)


@pytest.mark.slow  # three small jobs: ~1.5 minutes on 2 cores
def test_grpo_resume_replays_the_uninterrupted_run_exactly(tmp_path):
    """2 iterations, then ``trainer.resume=auto`` to 4 == 4 iterations in one go: the same rewards, losses,
    KLs, draws and evaluations, and the same adapters. The resumed run recomputes the frozen trunk it had cached."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    out = job(whole, "trainer.max_iterations=4")
    assert out.returncode == 0, out.stderr[-3000:]
    out = job(resumed, "trainer.max_iterations=2")
    assert out.returncode == 0, out.stderr[-3000:]
    out = job(resumed, "trainer.max_iterations=4", "trainer.resume=auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr and "at iteration 2" in out.stderr, out.stderr[-2000:]
    a, b = rows(whole), rows(resumed)
    assert sorted(a) == sorted(b) == [-1, 0, 1, 2, 3]
    for iteration in (-1, 0, 1, 2, 3):
        x, y = numbers(a[iteration]), numbers(b[iteration])
        assert x.keys() == y.keys(), iteration
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-6), (iteration, key, x[key], y[key])
    assert {"reward/proxy", "train/kl", "rollout/reward_group_std"} <= a[3].keys() and "eval/ca_lddt" in a[3]
    x = torch.load(whole / "checkpoint_latest.pth", weights_only=True)
    y = torch.load(resumed / "checkpoint_latest.pth", weights_only=True)
    assert x["iteration"] == y["iteration"] == 4 and x["model"].keys() == y["model"].keys()
    for key in x["model"]:
        torch.testing.assert_close(x["model"][key], y["model"][key], rtol=0, atol=1e-6, msg=key)
    verdict = json.loads((whole / "acceptance.json").read_text())
    assert {"max_nan", "min_reward_std", "max_flat_group_frac"} <= set(verdict["checks"]), verdict
    assert 0.0 <= verdict["checks"]["max_flat_group_frac"]["value"] <= 1.0


@pytest.mark.slow  # two ranks on 2 cores: ~1 minute
def test_grpo_torchrun_two_ranks(tmp_path):
    """``torchrun --nproc_per_node=2``: exit 0, rank 0 writes, each rank samples its own targets (draws r, r + 2,
    ...), and DDP accepts the update's several denoiser forwards (one per target) before each backward."""
    out, run_dir, draws = torchrun_job(tmp_path, *SMALL, "trainer.max_iterations=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draws", "launch.py", "run"], "only rank 0 writes"
    assert sorted(rows(run_dir)) == [-1, 0, 1, 2]
    logged = {r: [json.loads(x) for x in (draws / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    for r in (0, 1):  # 2 targets per iteration and rank
        assert [d["draw"] for d in logged[r]] == [r, r + 2, r + 4, r + 6, r + 8, r + 10], logged[r]
    assert rows(run_dir)[2]["rollout/trunk_passes"] == 2.0
    assert (run_dir / "acceptance.json").is_file() and (run_dir / "checkpoint_latest.pth").is_file()
