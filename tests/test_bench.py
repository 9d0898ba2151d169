"""The evidence bench runs end to end on tiny inputs and its pass/fail checks follow the targets."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import evidence  # noqa: E402


def test_checks_follow_the_issue_targets():
    base = {"force_rms_ev_per_angstrom": 1.0, "molecule_stability": 0.50, "validity_x_uniqueness": 0.80}
    good = {"force_rms_ev_per_angstrom": 0.79, "molecule_stability": 0.485, "validity_x_uniqueness": 0.76}
    bad = {"force_rms_ev_per_angstrom": 0.81, "molecule_stability": 0.47, "validity_x_uniqueness": 0.74}
    meta = {"num": 1, "seed": 0, "num_steps": 10}
    _, checks = evidence.table(base, good, meta)
    assert all(checks.values())
    text, checks = evidence.table(base, bad, meta)
    assert not any(checks.values())
    assert "| -19.0 % |" in text.replace("+", "")


def test_evidence_script_compares_two_checkpoints(tmp_path):
    model_cfg = ROOT / "conf/model/edm/small.yaml"
    cfg = OmegaConf.load(model_cfg)
    cfg.checkpoint = None
    torch.manual_seed(0)
    torch.save(instantiate(cfg).module.state_dict(), tmp_path / "a.pth")
    torch.manual_seed(1)
    torch.save(instantiate(cfg).module.state_dict(), tmp_path / "b.pth")
    out = subprocess.run([sys.executable, str(ROOT / "bench/evidence.py"), "--base", str(tmp_path / "a.pth"),
                          "--post", str(tmp_path / "b.pth"), "--model-config", str(model_cfg), "--num", "6",
                          "--batch-size", "3", "--num-steps", "10", "--workers", "1", "--out-dir", str(tmp_path / "ev")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "ev/evidence.json").read_text())
    assert report["base"]["num_samples"] == report["post"]["num_samples"] == 6
    assert set(report["checks"]) == {"force RMS drops by >= 20 %", "molecule stability falls by <= 2 points",
                                     "validity x uniqueness falls by <= 5 points"}
    assert (tmp_path / "ev/force_rms.png").stat().st_size > 1000
    samples = torch.load(tmp_path / "ev/samples_base.pt", weights_only=True)
    assert samples["positions"].shape[0] == 6


def test_precision_bench_prints_float32_identity_and_bf16_cosines():
    out = subprocess.run([sys.executable, str(ROOT / "bench/precision.py"), "--ks", "0,50", "model=edm/small",
                          "model.dynamics.num_layers=2", "model.dynamics.hidden_nf=16", "model.checkpoint=null"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    cosines = {int(line.split("= ")[1].split(":")[0]): float(line.split("cosine ")[1].split(",")[0])
               for line in lines if line.startswith("bfloat16")}
    assert set(cosines) == {0, 50}
    assert cosines[50] == 1.0, "every step in full precision: exactly the float32 gradient"
    assert cosines[0] < 1.0


def test_egnn_floor_bench_prints_both_rows_with_matmul_shares():
    out = subprocess.run([sys.executable, str(ROOT / "bench/egnn_floor.py"), "--layers", "2", "--hidden", "16",
                          "--molecules", "3", "--atoms", "5", "--repeats", "2", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(60 edges)" in out.stdout  # 3 molecules x 5 x 4 directed pairs
    row = re.compile(r"^\s+([\w-]+) .*?: +([\d.]+) ms; matmuls alone +([\d.]+) ms \((\d+) %\); the rest +(-?[\d.]+) ms$")
    rows = [m.groups() for m in map(row.match, out.stdout.splitlines()) if m]
    assert [r[0] for r in rows] == ["sampling", "training", "per-sample"]
    for _, real, floor, share, rest in rows:
        assert float(real) > 0 and float(floor) > 0
        assert abs(float(real) - float(floor) - float(rest)) < 0.02
        # The share comes from unrounded times; the printed ones are rounded to 0.01 ms.
        r, f = float(real), float(floor)
        assert abs(100 * f / r - int(share)) <= 1 + 100 * 0.005 * (1 / r + f / r**2)


def test_fed_grpo_bench_prints_phases_and_says_where_the_gradients_are_taken():
    def bench(*extra: str) -> str:
        out = subprocess.run([sys.executable, str(ROOT / "bench/fed_grpo.py"), "--layers", "1", "--hidden", "8",
                              "--steps", "10", "--skip-prefix", "2", "--iterations", "1", "--warmup", "0",
                              "--threads", "1", "reward=dummy", "filter=none", *extra],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    phases = re.compile(r"^seconds per iteration: ([\d.]+) +\(rollout ([\d.]+), reward ([\d.]+), update ([\d.]+)\)$", re.M)
    fused, replay = bench(), bench("trainer.fused_rollout=false")
    for text in (fused, replay):
        total, *parts = map(float, phases.search(text).groups())
        assert abs(total - sum(parts)) < 0.02
    assert "the rollout takes the per-sample gradients" in fused and "sampling throughput" not in fused
    assert "sampling throughput" in replay and "per-sample" not in replay
