"""The dry run's report (elign.engine.dryrun): the batch walk and the formatting of describe()."""

import dataclasses

import numpy as np
import torch

from elign.engine.dryrun import describe_value, report, shapes, target_name


@dataclasses.dataclass
class Pair:
    left: torch.Tensor
    right: list


def test_shapes_walks_dicts_lists_dataclasses_and_tensors():
    batch = {"inputs": {"x": torch.zeros(2, 3), "mask": torch.ones(2, dtype=torch.bool)},
             "meta": {"id": "1crn", "n": 7, "ids": ["a", "b"]},
             "stack": [torch.zeros(4), torch.zeros(4)],
             "pair": Pair(np.zeros((5, 1), dtype=np.float32), [torch.zeros(1), {"k": torch.zeros(2, 2)}])}
    assert shapes(batch) == {
        "inputs/x": "(2, 3) float32", "inputs/mask": "(2,) bool",
        "meta/id": "'1crn'", "meta/n": "7", "meta/ids": "list[2] ['a', 'b']",
        "stack": "list[2] of (4,) float32",
        "pair/left": "(5, 1) float32", "pair/right/0": "(1,) float32", "pair/right/1/k": "(2, 2) float32"}
    assert shapes(torch.zeros(3, dtype=torch.long)) == {"batch": "(3,) int64"}
    long = shapes({"xs": [{"a": torch.zeros(1)}] * 6})
    assert list(long) == ["xs/0/a", "xs/1/a", "xs/2/a", "xs/3/a", "xs/..."] and long["xs/..."] == "2 more of list[6]"


def test_report_prints_wiring_batch_and_only_new_describe_entries():
    batch = {"inputs": {"x": torch.zeros(2, 3)}}
    text = report("/r (a run would create it)", {"model": ("tiny", torch.nn.Linear(1, 1)), "evaluator": (None, None)},
                  batch, {"inputs/x": (2, 3), "outputs/y": (2, 4), "losses/loss": 1.23456789, "n": 5}, "describe")
    lines = text.splitlines()
    assert "run directory: /r (a run would create it)" in lines
    assert "  model      tiny -> torch.nn.modules.linear.Linear" in lines
    assert "  evaluator  null -> null" in lines
    assert "  inputs/x  (2, 3) float32" in lines
    assert "policy.describe(batch) (1 batch entries as above):" in lines
    assert "  outputs/y    (2, 4)" in lines and "  losses/loss  1.23457" in lines and "  n            5" in lines
    assert not any(line.startswith("  inputs/x  (2, 3)") and "float32" not in line for line in lines)


def test_describe_value_and_target_name():
    assert describe_value((1, 2)) == "(1, 2)" and describe_value(0.5) == "0.5" and describe_value("s") == "s"
    assert describe_value(torch.tensor(2.0)) == "2" and describe_value(torch.zeros(2)) == "(2,) float32"
    assert target_name(None) == "null" and target_name(torch.nn.Linear) == "torch.nn.modules.linear.Linear"
