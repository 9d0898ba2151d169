"""Packed pretraining under data parallelism: two gloo ranks read different packed rows, together
the rows one process reads, and take exactly its steps (token-weighted accumulation, so rows with
unequal numbers of target tokens average as one global token mean) and log its loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from hydra import compose, initialize_config_dir  # noqa: E402

from elign.engine.distributed import DistInfo  # noqa: E402
from tests.elign.engine.ddp_harness import run_ranks  # noqa: E402
from tests.molgen_grpo.test_pretrain_job import CONF, TINY, built  # noqa: E402

STEPS, ACCUM = 3, 2


def _pretrain(info: DistInfo, run_dir: str, batch_size: int) -> dict[str, Any]:
    """``STEPS`` optimizer steps of ``ACCUM`` batches each; returns the weights, the rows this rank
    read (from a replica of its data stream) and, on rank 0, the logged losses."""
    import run as run_module

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=molgen/pretrain", *TINY, f"dataloader.batch_size={batch_size}",
                                           f"trainer.grad_accum_steps={ACCUM}", f"trainer.max_iterations={STEPS}",
                                           "trainer.eval_interval=0"])
    torch.manual_seed(cfg.seed)
    policy = run_module.build(cfg, "model")
    data = run_module.build(cfg, "dataloader")
    trainer = run_module.build(cfg, "trainer", policy=policy, strategy=run_module.build(cfg, "strategy"),
                               dataloader=data, run_dir=f"{run_dir}/{info.rank}", dist=info, reward=None, filter=None)
    trainer.fit()
    replica = run_module.build(cfg, "dataloader")
    replica.shard(info.rank, info.world_size)
    seen = torch.cat([next(replica)["input_ids"] for _ in range(STEPS * ACCUM)])  # [rows, L]
    assert replica.state_dict() == data.state_dict(), "the trainer read exactly these rows"
    params = torch.cat([p.detach().flatten() for p in policy.module.parameters()])
    losses = torch.tensor([])
    if info.rank == 0:
        rows = [json.loads(x) for x in (Path(run_dir) / "0" / "metrics.jsonl").read_text().splitlines()]
        losses = torch.tensor([r["train/loss"] for r in rows])
    return {"params": params, "seen": seen, "losses": losses}


@built
def test_two_ranks_read_different_rows_and_equal_one_process(tmp_path):
    single = _pretrain(DistInfo(0, 1, 0, torch.device("cpu")), str(tmp_path / "single"), 4)
    ranks = run_ranks(_pretrain, tmp_path / "ranks", str(tmp_path / "ddp"), 2)
    first, second = ranks[0]["seen"], ranks[1]["seen"]
    row_set = lambda rows: sorted(tuple(r.tolist()) for r in rows)  # noqa: E731
    assert not set(row_set(first)) & set(row_set(second)), "each rank reads different packed rows"
    assert row_set(torch.cat([first, second])) == row_set(single["seen"]), "together: one process's rows"
    # the rows hold unequal numbers of target tokens, so a mean of per-rank means would differ
    targets = [int((r != 0).sum()) for r in single["seen"]]
    assert len(set(targets)) > 1
    for rank in ranks:
        torch.testing.assert_close(rank["params"], single["params"], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ranks[0]["losses"], single["losses"], atol=1e-6, rtol=1e-6)
