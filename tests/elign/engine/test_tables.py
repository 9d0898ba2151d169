"""Sample tables: every N iterations a JSONL table of groups, rewards, keep flags and advantages
(plus prompts and completions when the rollout carries text), and the logger's table."""

import json

import pytest
import torch

from elign.engine.strategies.grpo import GRPOStrategy
from tests.elign.engine.test_token_domain import make_trainer
from tests.elign.engine.toy_tokens import TokenPolicy

MAX_LEN = 12


class TableLogger:
    run_id = None

    def __init__(self):
        self.tables = []

    def start(self, run_dir, config, run_id):
        pass

    def log(self, metrics, step):
        pass

    def log_table(self, name, columns, rows, step):
        self.tables.append((name, columns, rows, step))

    def finish(self):
        pass


def test_tables_every_interval_hold_rewards_and_group_advantages(tmp_path):
    torch.manual_seed(0)
    logger = TableLogger()
    trainer = make_trainer(tmp_path, TokenPolicy(max_len=MAX_LEN, temperature=0.7), GRPOStrategy(scale_rewards="none"),
                           max_iterations=5, sample_table_interval=2, sample_table_rows=16, logger=logger)
    trainer.fit()
    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert files == ["iteration_000000.jsonl", "iteration_000002.jsonl", "iteration_000004.jsonl"]
    rows = [json.loads(x) for x in (tmp_path / "samples" / files[0]).read_text().splitlines()]
    assert len(rows) == 16 and [r["sample"] for r in rows] == list(range(16))
    for group in {r["group"] for r in rows}:  # scale_rewards none: advantage = reward - group mean
        members = [r for r in rows if r["group"] == group]
        mean = sum(r["reward/score"] for r in members) / len(members)
        for r in members:
            assert r["advantage"] == pytest.approx(r["reward/score"] - mean, abs=1e-5)
            assert r["keep"] is True and r["failed/score"] is False
    assert [t[3] for t in logger.tables] == [0, 2, 4] and logger.tables[0][1][:2] == ["sample", "group"]


def test_no_tables_by_default(tmp_path):
    trainer = make_trainer(tmp_path, TokenPolicy(max_len=MAX_LEN, temperature=0.7), GRPOStrategy(), max_iterations=2)
    trainer.fit()
    assert not (tmp_path / "samples").exists()
