"""The GRPO job from the command line: an interrupted run resumed from its checkpoint replays the
uninterrupted one exactly (prompts, completions, rewards, losses and weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["experiment=molgen/grpo_conformer", "trainer.progress=false", "trainer.eval_interval=0",
         "dataloader.batch_size=4", "dataloader.group_size=2", "trainer.micro_batch_size=4", "model.max_new_tokens=64",
         "reward.posebusters=off", "trainer.save_interval=1", "trainer.lr_schedule.warmup_steps=0",
         "trainer.lr_schedule.min_lr_ratio=1.0", "trainer.sample_table_interval=1"]  # constant LR: runs of 2 and 1+1 agree


def run(run_dir: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={run_dir}", *SMALL, *extra],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_resumed_grpo_run_replays_the_uninterrupted_one(tmp_path):
    run(tmp_path / "straight", "trainer.max_iterations=3")
    run(tmp_path / "resumed", "trainer.max_iterations=2")
    run(tmp_path / "resumed", "trainer.max_iterations=3", "trainer.resume=auto")
    for name in ("iteration_000000.jsonl", "iteration_000002.jsonl"):
        assert (tmp_path / "straight/samples" / name).read_text() == (tmp_path / "resumed/samples" / name).read_text()
    keys = ("iteration", "reward/conformer", "train/loss", "completions/mean_length", "num_tokens",
            "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
    rows = {name: [{k: r[k] for k in keys} for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())]
            for name in ("straight", "resumed")}
    assert rows["straight"] == rows["resumed"] and [r["iteration"] for r in rows["straight"]] == [0, 1, 2]
    tokens = [r["num_tokens"] for r in rows["straight"]]  # TRL's running total, continued across the resume
    assert tokens[0] > 0 and tokens[1] > tokens[0] and tokens[2] > tokens[1]
    a = torch.load(tmp_path / "straight/checkpoint_latest.pth", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed/checkpoint_latest.pth", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
