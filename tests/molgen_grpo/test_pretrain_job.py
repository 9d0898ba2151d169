"""The pretraining job (experiment=molgen/pretrain) on the engine: the command line end to end, the
loss falls, resuming mid-run equals a straight run, and the config glue (package: JSONL paths, WSDS
under the trainer's lr_schedule keys)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import run as run_module
from elign.engine.distributed import DistInfo
from elign.engine.errors import ConfigError
from molgen_grpo.conformers import MAPPING_NAME
from molgen_grpo.packing import PackedJsonl
from molgen_grpo.pretraining import SHIPPED_DATA, wsds_schedule
from molgen_grpo.schedule import WSDSSchedule
from molgen_grpo.tokenizer import ASSET_PATH, resolve_path

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
TRAIN = f"{SHIPPED_DATA}/train.jsonl"
built = pytest.mark.skipif(not (Path(resolve_path(SHIPPED_DATA)) / MAPPING_NAME).is_file(),
                           reason="conformer dataset not built")
# Small rows and batches: a few seconds per run on one thread.
TINY = ["model=molgen/qwen3_tiny_random", "dataloader.batch_size=2", "dataloader.dataset.seq_len=256",
        "dataloader.dataset.shuffle_buffer=64", "dataloader.dataset.lookahead=8", "trainer.progress=false",
        "trainer.save_interval=1", "trainer.lr_schedule.warmup_steps=2"]


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@built
def test_command_line_run_logs_loss_and_tokens_per_second(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "experiment=molgen/pretrain", "trainer.max_iterations=3",
                          "dataloader.batch_size=2", "dataloader.dataset.seq_len=256", "trainer.progress=false",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = rows_of(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [-1, 0, 1, 2]  # -1: the held-out evaluation of the starting weights
    start, rows = rows[0], rows[1:]
    assert start["eval/loss"] == pytest.approx(math.log(179), rel=0.1) and start["eval/parse_rate"] == 0.0
    assert math.isfinite(rows[-1]["eval/loss"]) and 0.0 <= rows[-1]["eval/graph_match_rate"] <= 1.0
    assert rows[-1]["data/rows"] == 3 * 2 and rows[-1]["data/epoch"] == 0  # the packer's counters are logged
    for row in rows:
        assert math.isfinite(row["train/loss"]) and row["train/tokens_per_s"] > 0 and row["train/lr"] > 0
    assert rows[0]["train/loss"] == pytest.approx(math.log(179), rel=0.1)  # random init: ~uniform over the vocabulary
    assert (tmp_path / "run" / "checkpoint_latest.pth").is_file()


def train(run_dir: Path, iterations: int, resume: str | None = None, stop_after: int | None = None,
          extra: tuple[str, ...] = ()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=molgen/pretrain", *TINY, *extra,
                                           f"trainer.max_iterations={iterations}", f"trainer.resume={resume or 'null'}"])
    torch.manual_seed(cfg.seed)
    policy = run_module.build(cfg, "model")
    trainer = run_module.build(cfg, "trainer", policy=policy, strategy=run_module.build(cfg, "strategy"),
                               dataloader=run_module.build(cfg, "dataloader"), run_dir=str(run_dir),
                               dist=DistInfo(0, 1, 0, torch.device("cpu")), reward=None, filter=None)
    if stop_after is not None:  # a crash: same config (LR schedule over all iterations), stops early
        trainer.max_iterations = stop_after
    trainer.fit()
    return policy


@built
def test_resume_equals_a_straight_run(tmp_path):
    straight = train(tmp_path / "a", 4)
    train(tmp_path / "b", 4, stop_after=2)
    resumed = train(tmp_path / "b", 4, resume="auto")
    a, b = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    assert [r["iteration"] for r in b] == [0, 1, 2, 3]
    for key in ("train/loss", "train/lr", "train/num_samples", "train/grad_norm"):
        assert [r[key] for r in a if key in r] == [r[key] for r in b if key in r], key
    for (name, p), q in zip(straight.module.named_parameters(), resumed.module.parameters()):
        assert torch.equal(p, q), name


@built
def test_loss_falls(tmp_path):
    train(tmp_path, 30, extra=("dataloader.batch_size=4",))
    losses = [r["train/loss"] for r in rows_of(tmp_path)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"


def test_wsds_schedule_takes_the_trainer_defaults_total_steps():
    assert wsds_schedule(2, total_steps=10).bind(99).checkpoints == [10]
    assert wsds_schedule(2).bind(99).checkpoints == [99]  # null: the run's last step
    assert wsds_schedule(2, checkpoints=[5, 10]).bind(99).checkpoints == [5, 10]
    assert isinstance(wsds_schedule(2), WSDSSchedule)
    with pytest.raises(ConfigError, match="total_steps"):
        wsds_schedule(2, checkpoints=[10], total_steps=10)
    with pytest.raises(ConfigError, match="total_steps=2.*warmup_steps=2"):
        wsds_schedule(2, total_steps=2)


def test_a_run_within_the_warmup_only_warms_up():
    schedule = wsds_schedule(25).bind(3)  # e.g. trainer.max_iterations=3 with the recipe's 25 warmup steps
    assert [schedule(s) for s in range(3)] == [1 / 26, 2 / 26, 3 / 26]
    assert wsds_schedule(2).bind(2).checkpoints == [3]


@built
def test_packed_jsonl_resolves_package_paths(tmp_path):
    dataset = PackedJsonl(TRAIN, ASSET_PATH, seq_len=256, shuffle_buffer=4, lookahead=2)
    assert dataset.paths == [resolve_path(TRAIN)] and Path(dataset.paths[0]).is_file()
    row = dataset.next_row()
    assert row["input_ids"].shape == (256,) and int(row["attention_mask"].sum()) > 16
    with pytest.raises(FileNotFoundError, match="missing.jsonl.*build_molgen_data"):
        PackedJsonl(f"{SHIPPED_DATA}/missing.jsonl", ASSET_PATH)
