"""The Boltz SFT recipe as a user runs it (``python run.py experiment=boltz/sft_lora``), in small jobs:
the run's files (acceptance verdict, predicted structures and plots), exact resume, and torchrun with
two ranks that draw different targets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "run.py"
#: A small job: 1crn alone for evaluation (2 samples x 3 steps), 32-token crops, checkpoints and
#: evaluations every 2 iterations (plus the starting model's, logged as iteration -1).
SMALL = ["experiment=boltz/sft_lora", "trainer.eval_interval=2", "trainer.eval_at_start=true", "trainer.save_interval=2",
         "evaluator.diffusion_samples=2", "evaluator.sampling_steps=3", "evaluator.ids=[1crn]",
         "dataloader.max_tokens=32", "trainer.progress=false"]
#: Metrics that measure time, not the run's numbers.
TIMING = ("timing/",)


def _run(args: list[str], cwd: Path, timeout: int = 900, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def job(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(RUN), *SMALL, f"hydra.run.dir={run_dir}", *overrides], cwd=run_dir.parent)


def rows(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    out = {r["iteration"]: r for r in map(json.loads, lines)}
    assert len(out) == len(lines), "one line per iteration"
    return out


def numbers(row: dict) -> dict:
    """A metrics row without its timings (wall-clock seconds and throughputs differ between runs)."""
    return {k: v for k, v in row.items() if not k.startswith(TIMING) and not k.endswith("_per_s")}


def test_recipe_writes_acceptance_and_predictions(tmp_path):
    """(c) The recipe's acceptance report and the evaluator's mmCIF/PDB samples and PNGs."""
    run_dir = tmp_path / "run"
    out = job(run_dir, "trainer.max_iterations=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r for r in rows(run_dir)] == [-1, 0, 1]
    verdict = json.loads((run_dir / "acceptance.json").read_text())
    assert isinstance(verdict["passed"], bool) and verdict["iterations"] == 2
    assert {"max_nan", "max_loss_slope"} <= set(verdict["checks"])
    assert verdict["checks"]["max_nan"]["passed"], verdict
    assert ("acceptance PASS" if verdict["passed"] else "acceptance FAIL") in out.stderr
    last = rows(run_dir)[1]
    assert 0.0 <= last["eval/ca_lddt"] <= 1.0 and math.isfinite(last["eval/distogram_ce"])
    predictions = run_dir / "predictions"
    cifs = sorted(p.name for p in predictions.glob("*.cif"))
    pngs = sorted(p.name for p in predictions.glob("*.png"))
    assert cifs == ["1crn_sample0.cif", "1crn_sample1.cif"], cifs  # evaluator.diffusion_samples=2
    assert pngs == ["1crn_distance_map.png", "1crn_lddt.png"], pngs
    for name in pngs:
        assert (predictions / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    cif = (predictions / cifs[0]).read_text()
    atoms = [line for line in cif.splitlines() if line.startswith(("ATOM", "HETATM"))]
    assert cif.startswith("data_") and "_atom_site." in cif and len(atoms) > 100, len(atoms)


@pytest.mark.slow  # three jobs: ~2 minutes on 2 cores
def test_resume_replays_the_uninterrupted_run_exactly(tmp_path):
    """(a) 2 iterations, then ``trainer.resume=auto`` to 4 == 4 iterations in one go: the same metrics
    rows (losses, gradient norms, learning rates, draws, evaluations) and the same adapters."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    first = [sys.executable, str(RUN), *SMALL, "trainer.max_iterations=4", f"hydra.run.dir={whole}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    # The uninterrupted run and the first half of the interrupted one run side by side (2 cores).
    with subprocess.Popen(first, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        out = job(resumed, "trainer.max_iterations=2")
        stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(rows(resumed)) == [-1, 0, 1]
    out = job(resumed, "trainer.max_iterations=4", "trainer.resume=auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr and "at iteration 2" in out.stderr, out.stderr[-2000:]

    a, b = rows(whole), rows(resumed)
    assert sorted(a) == sorted(b) == [-1, 0, 1, 2, 3]
    for iteration in (2, 3):
        x, y = numbers(a[iteration]), numbers(b[iteration])
        assert x.keys() == y.keys(), iteration
        assert "train/loss" in x and "eval/ca_lddt" in a[3]
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-6), (iteration, key, x[key], y[key])
    assert a[3]["data/draws"] == 4 and a[3]["optimizer_step"] == b[3]["optimizer_step"] == 4
    # Iterations 0-1 of the short run are those of the long one too (the LR schedule is warmup + constant).
    for iteration in (-1, 0, 1):
        assert numbers(a[iteration]) == pytest.approx(numbers(b[iteration]), rel=1e-6, abs=1e-6), iteration

    x = torch.load(whole / "checkpoint_latest.pth", weights_only=True)
    y = torch.load(resumed / "checkpoint_latest.pth", weights_only=True)
    assert x["iteration"] == y["iteration"] == 4 and x["dataloader"] == y["dataloader"] == {"draws": 4}
    assert x["model"].keys() == y["model"].keys()
    assert all("lora" in k for k in x["model"] if k != "base_fingerprint") and "base_fingerprint" in x["model"]
    for key in x["model"]:
        torch.testing.assert_close(x["model"][key], y["model"][key], rtol=0, atol=1e-6, msg=key)


#: Runs run.py as torchrun's script, with StructureBatches.item logging each training draw of each rank
#: (rank, draw index, target) to $DRAW_LOG/rank<r>.jsonl: what each rank really trained on.
LAUNCHER = '''
import json, os, runpy, sys
from pathlib import Path

import boltz_ft.dataset as dataset

log = Path(os.environ["DRAW_LOG"]) / f"rank{os.environ.get('RANK', '0')}.jsonl"
item = dataset.StructureBatches.item


def logged(self, draw):
    batch = item(self, draw)
    with log.open("a") as f:
        f.write(json.dumps({"rank": self.rank, "world_size": self.world_size, "draw": draw,
                            "pdb_id": batch["meta"]["pdb_id"]}) + "\\n")
    return batch


dataset.StructureBatches.item = logged
sys.argv[0] = RUN
runpy.run_path(RUN, run_name="__main__")
'''


def torchrun_job(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """``torchrun --nproc_per_node=2`` of run.py through :data:`LAUNCHER` in ``tmp_path``: the result, the run
    directory and the folder of the ranks' draw logs."""
    launcher, draws = tmp_path / "launch.py", tmp_path / "draws"
    launcher.write_text(f"RUN = {str(RUN)!r}\n" + LAUNCHER)
    draws.mkdir()
    run_dir = tmp_path / "run"
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
                *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
               env_extra={"DRAW_LOG": str(draws), "PYTHONPATH": str(ROOT)})
    return out, run_dir, draws


@pytest.mark.slow  # two ranks on 2 cores: ~1.5 minutes
def test_torchrun_two_ranks_draw_different_targets(tmp_path):
    """(b) ``torchrun --nproc_per_node=2``: exit 0, one metrics.jsonl (rank 0), and each rank trains on
    its own draws (rank r takes draws r, r + 2, ...), so the two ranks' targets of a step differ."""
    out, run_dir, draws = torchrun_job(tmp_path, *SMALL, "trainer.max_iterations=4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draws", "launch.py", "run"], "only rank 0 writes"
    assert sorted(rows(run_dir)) == [-1, 0, 1, 2, 3], "one line per iteration, from rank 0 only"
    assert not list(run_dir.glob("*rank*")) and (run_dir / "checkpoint_latest.pth").is_file()
    assert (run_dir / "acceptance.json").is_file() and list((run_dir / "predictions").glob("*.cif"))
    logged = {r: [json.loads(x) for x in (draws / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    for r in (0, 1):
        assert [d["draw"] for d in logged[r]] == [r, r + 2, r + 4, r + 6], logged[r]
        assert all(d["rank"] == r and d["world_size"] == 2 for d in logged[r])
    targets = [(d0["pdb_id"], d1["pdb_id"]) for d0, d1 in zip(logged[0], logged[1])]
    assert targets[0][0] != targets[0][1], targets  # draws 0 and 1: two places of one epoch's permutation
    assert sum(a != b for a, b in targets) >= 3, targets
    assert rows(run_dir)[3]["data/draws"] == 4  # each rank drew 4 batches (mean over ranks)


def test_cli_predicts_reports_exports_and_the_export_loads_as_the_pretrained_option(tmp_path):
    """After a run: `python -m boltz_ft.cli predict / report / export`, and the exported checkpoint is what
    model=boltz/pretrained loads (safe loading: no pickled code), checked with a dry run."""
    run_dir = tmp_path / "run"
    out = job(run_dir, "trainer.max_iterations=1", "trainer.eval_interval=0")
    assert out.returncode == 0, out.stderr[-3000:]
    cli = [sys.executable, "-m", "boltz_ft.cli"]
    pdb = ROOT / "boltz_ft" / "data" / "pdb" / "1crn.pdb"
    out = _run([*cli, "predict", str(pdb), "--run-dir", str(run_dir), "--samples", "2", "--steps", "3",
                "--recycling-steps", "0", "--max-tokens", "24", "--out-dir", str(tmp_path / "pred")], cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(scores["ca_lddt"]) == 2 and all(0.0 <= v <= 1.0 for v in scores["ca_lddt"])
    assert (tmp_path / "pred" / "1crn_sample1.cif").stat().st_size > 1000
    out = _run([*cli, "report", "--run-dir", str(run_dir)], cwd=ROOT)
    assert out.returncode == 0 and (run_dir / "curves.png").stat().st_size > 1000, out.stderr[-2000:]
    assert "acceptance" in out.stdout
    out = _run([*cli, "export", "--run-dir", str(run_dir), "--out", str(tmp_path / "merged.ckpt")], cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    merged = torch.load(tmp_path / "merged.ckpt", weights_only=True)  # plain tensors and containers only
    assert not any("lora" in k for k in merged["state_dict"])
    # The tiny dimensions are in the exported hyper-parameters: no boltz-predict overrides for this file.
    out = _run([sys.executable, str(RUN), *SMALL, "model=boltz/pretrained", f"model.backend.checkpoint={tmp_path / 'merged.ckpt'}",
                "model.backend.overrides=null", "dry_run=true", f"hydra.run.dir={tmp_path / 'dry'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "outputs/pdistogram" in out.stdout and not (tmp_path / "dry").exists()
    # GRPO from this SFT run: its adapters merged into the base (model.base_run), fresh adapters on top.
    out = _run([sys.executable, str(RUN), "experiment=boltz/grpo", f"model.base_run={run_dir}", "dry_run=true",
                "dataloader.max_tokens=24", f"hydra.run.dir={tmp_path / 'grpo'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BoltzSamplerPolicy" in out.stdout and not (tmp_path / "grpo").exists()
    out = _run([*cli, "predict", str(pdb), "--run-dir", str(tmp_path / "absent")], cwd=ROOT)
    assert out.returncode == 2 and "config.yaml" in out.stderr
