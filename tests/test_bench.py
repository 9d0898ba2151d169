"""The evidence bench runs end to end on tiny inputs and its pass/fail checks follow the targets."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def test_evidence_bench_pairs_every_training_seed_with_every_sampling_seed(tmp_path):
    """Two 'post-trained' checkpoints (training seeds 7, 8) x two sampling seeds against one base."""
    model_cfg = ROOT / "conf/model/edm/small.yaml"
    cfg = OmegaConf.load(model_cfg)
    cfg.checkpoint = None
    for seed, name in ((0, "a.pth"), (1, "b.pth"), (2, "c.pth")):
        torch.manual_seed(seed)
        torch.save(instantiate(cfg).module.state_dict(), tmp_path / name)
    cmd = [sys.executable, str(ROOT / "bench/evidence.py"), "--base", str(tmp_path / "a.pth"),
           "--post", str(tmp_path / "b.pth"), "--post", str(tmp_path / "c.pth"), "--train-seeds", "7", "8",
           "--sample-seeds", "0", "1", "--model-config", str(model_cfg), "--num", "4", "--batch-size", "4",
           "--num-steps", "10", "--workers", "1", "--threads", "1", "--out-dir", str(tmp_path / "ev")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1 = a target failed (random weights: expected)
    report = json.loads((tmp_path / "ev/evidence.json").read_text())
    assert report["passed"] == (out.returncode == 0) and ("**PASS**" if report["passed"] else "**FAIL**") in out.stdout
    assert sorted(report["post"]) == ["7,0", "7,1", "8,0", "8,1"] and sorted(report["base"]) == ["0", "1"]
    assert set(report["checks"]) == {"seed 7", "seed 8", "aggregate"}
    assert all(r["num_samples"] == 4 for r in report["post"].values())
    pair = next(p for p in report["pairs"] if (p["train_seed"], p["sample_seed"]) == (8, 1))
    base, post = report["base"]["1"], report["post"]["8,1"]
    assert pair["changes"]["atom_stability"] == pytest.approx(100 * (post["atom_stability"] - base["atom_stability"]))
    assert (tmp_path / "ev/force_rms.png").stat().st_size > 1000
    assert len(list((tmp_path / "ev/evals").glob("*.pt"))) == 6  # base and two models, two seeds each
    # Same seed, same sample: both models saw the same node counts.
    held = {p.name: torch.load(p, weights_only=True) for p in (tmp_path / "ev/evals").glob("*_sample1_*.pt")}
    masks = [h["samples"]["node_mask"].sum(1) for h in held.values()]
    assert all(torch.equal(masks[0], m) for m in masks[1:])
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("cached") == 6 and json.loads((tmp_path / "ev/evidence.json").read_text()) == report


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


def test_evidence_bench_trains_from_its_base_and_overrides_come_last(tmp_path, monkeypatch):
    """--train starts each run from --base (the comparison is against the weights it was trained from);
    an override after `--` still wins, because Hydra takes the last value of a key."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evidence_bench", ROOT / "bench/evidence.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(sys, "argv", ["evidence.py", "--train", "--train-seeds", "5", "--base", "/w/base.pth",
                                      "--runs-dir", str(tmp_path), "--", "strategy.kl_coef=0.04"])
    a, overrides = bench.parse()
    assert bench.train(a, 5, overrides) == str(tmp_path / "seed5")
    (cmd,) = calls
    assert cmd[2:] == ["experiment=edm/elign", "seed=5", f"hydra.run.dir={tmp_path / 'seed5'}",
                       "trainer.resume=auto", "model.checkpoint=/w/base.pth", "strategy.kl_coef=0.04"]
    # Without --base the bench compares against the base model the recipe itself starts from.
    for experiment, weights in (("edm/elign", "edm_base_10k.pth"), ("edm/fed_grpo", "edm_base.pth")):
        monkeypatch.setattr(sys, "argv", ["evidence.py", "--train", "--experiment", experiment])
        assert bench.parse()[0].base == f"package:elign/edm/weights/{weights}"


def test_molgen_speed_bench_runs_both_sides_on_full_length_completions(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench/molgen_grpo_speed.py"), "--hidden", "32", "--layers", "1",
                          "--completion-len", "8", "--batch", "4", "--group", "2", "--steps", "1", "--threads", "1",
                          "--repeats", "2", "--work-dir", str(tmp_path), "--out", str(tmp_path / "out.json")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "speed-up (completion tokens/s, ours / TRL)" in out.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    results = report["median"]
    assert [r["side"] for r in results] == ["ours", "trl"]
    assert [len(report["runs"][side]) for side in ("ours", "trl")] == [2, 2]
    for r in results:  # the stop tokens are biased away: both sides generate exactly batch x length tokens
        assert r["completion_tokens_per_step"] == 4 * 8, r
        assert r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0
        assert r in report["runs"][r["side"]]
    ours = results[0]
    assert ours["generate_s"] + ours["reward_s"] + ours["update_s"] == pytest.approx(ours["s_per_step"])


def test_molgen_evidence_bench_scores_shipped_and_post_trained_on_held_out_molecules(tmp_path):
    run = tmp_path / "run"
    trained = subprocess.run([sys.executable, str(ROOT / "run.py"), "experiment=molgen/grpo_conformer",
                              f"hydra.run.dir={run}", "trainer.max_iterations=1", "trainer.eval_interval=0",
                              "trainer.progress=false", "dataloader.batch_size=4", "dataloader.group_size=2",
                              "trainer.micro_batch_size=4", "reward.posebusters=off"],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = subprocess.run([sys.executable, str(ROOT / "bench/molgen_evidence.py"), "--post", str(run),
                          "--train-seeds", "0", "--sample-seeds", "0", "--max-molecules", "2",
                          "--samples-per-reference", "1", "--threads", "1", "--out-dir", str(tmp_path / "ev")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1 = a target failed (one GRPO step: expected)
    report = json.loads((tmp_path / "ev/evidence.json").read_text())
    assert report["verdicts"]["aggregate"] == (out.returncode == 0)
    pair = report["pairs"][0]
    assert pair["base"]["molecules"] == 4 and pair["post"]["molecules"] == 4  # 2 test + 2 valid
    assert pair["delta"]["mat_r"] == pytest.approx(100 * (pair["post"]["mat_r"] / pair["base"]["mat_r"] - 1), nan_ok=True)
    assert "targets" in out.stdout and len(list((tmp_path / "ev/evals").glob("*.json"))) == 2
    # --constrained decodes both models under the prompt's topology, whatever the run's own mode
    constrained = subprocess.run([*out.args, "--constrained"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert constrained.returncode in (0, 1), constrained.stderr[-3000:]
    pair = json.loads((tmp_path / "ev/evidence.json").read_text())["pairs"][0]
    assert pair["base"]["parse_rate"] == pair["post"]["parse_rate"] == 1.0
    assert len(list((tmp_path / "ev/evals").glob("*_constrained.json"))) == 2


def test_credit_bench_snr_statistics_hand_case():
    sys.path.insert(0, str(ROOT))
    from bench.boltz_grpo_credit import snr_stats

    # draws [1, 0], [3, 0], [1, 2], [3, 2]: mean [2, 1]; tr Σ = (4 * 1 + 4 * 1) / 3 = 8/3; |E g|² = 5 - (8/3)/4
    stats = snr_stats(torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 2.0], [3.0, 2.0]]))
    assert stats["noise"] == pytest.approx(8 / 3) and stats["signal"] == pytest.approx(5 - 2 / 3)
    assert stats["snr_per_rollout"] == pytest.approx((5 - 2 / 3) / (8 / 3))
    # halves' means [2, 0] and [2, 2]: cosine 2 * 2 / (2 * sqrt(8))
    assert stats["split_half_cosine"] == pytest.approx(4 / (2 * 8 ** 0.5))


def test_credit_bench_branches_at_every_stochastic_step_and_prints_every_channel(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench/boltz_grpo_credit.py"), "--targets", "1", "--rollouts", "4",
                          "--out", str(tmp_path / "credit.json"), "--", "dataloader.max_tokens=16",
                          "model.sampling_steps=6", "model.max_action_noise_angstrom=null", "model.shared_prefix=false",
                          "dataloader.group_size=2", "dataloader.batch_size=2"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "credit.json").read_text())
    steps = [r["branch_step"] for r in report["branch"]["rows"]]
    assert steps == list(range(len(steps))) and len(steps) >= 3  # k = 0 .. the step after the last stochastic one
    assert report["branch"]["rows"][-1]["t_hat_angstrom"] < report["branch"]["rows"][0]["t_hat_angstrom"]
    for name in ("lddt_ca", "neg_rmsd", "tm_score", "clash", "chain_break", "shuffled_lddt_ca"):
        assert f"| {name} |" in out.stdout and name in report["snr"]


def test_mlm_scorer_bench_prints_both_modes_for_every_modality():
    out = subprocess.run([sys.executable, str(ROOT / "bench/molgen_mlm_scorer.py"), "--limit", "3", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith(("| smiles", "| protein",
                                                                                           "| dna"))]
    assert [r[0].strip() for r in rows] == ["smiles", "protein", "dna"]
    for row in rows:
        assert int(row[1]) == 3 and all(float(x.replace(",", "")) > 0 for x in row[2:])


def test_mlm_grpo_bench_scores_shipped_and_post_trained_writers_with_the_runs_reward(tmp_path):
    run = tmp_path / "run"
    trained = subprocess.run([sys.executable, str(ROOT / "run.py"), "experiment=molgen/grpo_mlm", f"hydra.run.dir={run}",
                              "trainer.max_iterations=1", "trainer.eval_interval=0", "trainer.progress=false",
                              "dataloader.batch_size=4", "dataloader.group_size=2", "trainer.micro_batch_size=4",
                              "model.max_new_tokens=48"],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = subprocess.run([sys.executable, str(ROOT / "bench/molgen_mlm_grpo.py"), "--post", str(run),
                          "--train-seeds", "0", "--sample-seeds", "0", "--samples-per-prompt", "1", "--threads", "1",
                          "--throughput-limit", "2", "--out-dir", str(tmp_path / "ev")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1 = a target failed (one GRPO step: no promise)
    report = json.loads((tmp_path / "ev/evidence.json").read_text())
    pair, verdict = report["pairs"][0], report["verdicts"][0]
    assert pair["base"]["answers"] == pair["post"]["answers"] == 30.0  # 15 validation + 15 test rows, 1 answer each
    assert verdict["d_reward"] == pytest.approx(pair["post"]["mlm_reward"] - pair["base"]["mlm_reward"])
    assert verdict["passed"] == (out.returncode == 0)
    assert [r["modality"] for r in report["throughput"]] == ["smiles", "protein", "dna"]
    assert all(r["unmasked_mean_seq_per_s"] > 0 and r["masked_pll_seq_per_s"] > 0 for r in report["throughput"])
    assert len(list((tmp_path / "ev/evals").glob("*.json"))) == 2 and "targets" in out.stdout
    assert (tmp_path / "ev/curves.png").stat().st_size > 0
