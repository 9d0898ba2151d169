"""scripts/compare_metrics.py: equal runs pass, the first differing iteration is named, time keys are ignored."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts/compare_metrics.py"), str(a), str(b)],
                          capture_output=True, text=True, timeout=120)


def test_same_values_pass_and_wall_clock_keys_are_ignored(tmp_path):
    rows = [{"iteration": i, "reward/total": 0.1 * i, "timing/rollout": 1.0 + i} for i in range(3)]
    other = [dict(r, **{"timing/rollout": 9.0, "rollout/samples_per_s": 3.0, "new/key": 1.0}) for r in rows]
    out = run(write(tmp_path / "a.jsonl", rows), write(tmp_path / "b.jsonl", other))
    assert out.returncode == 0, out.stdout
    assert "values bitwise equal: 3; keys that differ: 0" in out.stdout
    assert "keys logged by one run only: new/key" in out.stdout


def test_a_difference_in_the_last_bit_fails_and_names_its_first_iteration(tmp_path):
    rows = [{"iteration": i, "train/loss": 1.0 / 3.0, "reward/total": float(i)} for i in range(4)]
    other = [dict(r) for r in rows]
    other[2]["train/loss"] = math.nextafter(1.0 / 3.0, 1.0)  # one ulp away
    other[3]["train/loss"] = 0.5
    out = run(write(tmp_path / "a.jsonl", rows), write(tmp_path / "b.jsonl", other[:3] + [other[3]]))
    assert out.returncode == 1
    assert "values bitwise equal: 6; keys that differ: 1" in out.stdout
    assert "train/loss: first differs at iteration 2, max relative difference 0.333" in out.stdout


def test_rows_are_paired_by_iteration_not_by_line(tmp_path):
    rows = [{"iteration": i, "x": float(i)} for i in range(-1, 3)]
    out = run(write(tmp_path / "a.jsonl", rows), write(tmp_path / "b.jsonl", rows[1:]))
    assert out.returncode == 0 and "iterations in one run only: [-1]" in out.stdout
