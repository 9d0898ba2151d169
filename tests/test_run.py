"""The command line: key-naming errors, the main job, every experiment end to end, a multirun sweep
(basic and joblib launchers), torchrun with two ranks, domain mixing refused at start-up. The
config tree itself (every option, signatures, comments) is tested in test_config.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import run as run_module
from elign.engine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("override,key", [
    ("model.num_steps=30", "model.num_steps"),
    ("dataloader.batch_size=7", "dataloader.batch_size"),
    ("strategy.advantage_mode=delta", "strategy.advantage_mode"),
])
def test_bad_value_names_full_key(override, key):
    cfg = compose_with(override)
    group = key.split(".")[0]  # (a trainer key is checked by the command-line test below)
    with pytest.raises(ConfigError) as info:
        run_module.build(cfg, group)
    assert info.value.key == key
    assert "allowed" in str(info.value)


def test_group_size_one_is_rejected_for_grpo():
    cfg = compose_with("dataloader.group_size=1", "dataloader.batch_size=4")
    with pytest.raises(ConfigError, match="dataloader.group_size"):
        run_module.check_compatible(cfg, run_module.build(cfg, "dataloader"), run_module.build(cfg, "strategy"))


def _run(args, cwd, timeout=600, env_extra=None):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override,key", [
    ("trainer.lr_schedule.min_lr_ratio=0", "trainer.lr_schedule.min_lr_ratio"),
    ("host_allocator=jemalloc", "host_allocator"),
    ("trainer.fused_rollout=maybe", "trainer.fused_rollout"),
    ("acceptance=default acceptance.max_nan=-1", "acceptance.max_nan"),
    # PBRS per-step advantages cannot be combined from per-sample gradient sums
    ("trainer.fused_rollout=true strategy.advantage_mode=pbrs_return_to_go", "trainer.fused_rollout"),
])
def test_cli_bad_value_exits_with_key_message(tmp_path, override, key):
    out = _run([sys.executable, str(ROOT / "run.py"), *override.split(), f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert key in out.stderr


# The short recipe: these tests exercise the CLI, not the default ELIGN recipe.
SMALL = ["experiment=edm/fed_grpo", "trainer.max_iterations=2", "model.num_steps=10", "model.skip_prefix=5",
         "trainer.progress=false"]


def test_cli_job_writes_run_files(tmp_path):
    out = _run([sys.executable, str(ROOT / "run.py"), "strategy=fed_grpo", "reward=dummy",
                f"hydra.run.dir={tmp_path / 'run'}", *SMALL], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "checkpoint_latest.pth", "checkpoint_best.pth"):
        assert (run_dir / name).is_file(), name
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_cli_acceptance_report_writes_its_verdict(tmp_path):
    out = _run([sys.executable, str(ROOT / "run.py"), "reward=dummy", "acceptance=default",
                f"hydra.run.dir={tmp_path / 'run'}", *SMALL], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]  # fail_exit is off: a verdict never changes the status
    verdict = json.loads((tmp_path / "run" / "acceptance.json").read_text())
    assert set(verdict) == {"passed", "checks", "iterations"} and verdict["iterations"] == 2
    assert set(verdict["checks"]) == {"max_nan", "max_loss_slope"}  # min_reward_std is off by default
    assert all({"value", "threshold", "passed"} <= set(c) for c in verdict["checks"].values())
    assert [line for line in out.stderr.splitlines() if line.startswith("acceptance ")], out.stderr[-2000:]


def test_cli_failed_acceptance_check_with_fail_exit_exits_3(tmp_path):
    # The constant reward gives every group zero spread: a minimum mean within-group std of 1 fails.
    out = _run([sys.executable, str(ROOT / "run.py"), "reward=dummy", "acceptance=default",
                "acceptance.min_reward_std=1.0", "acceptance.fail_exit=true", f"hydra.run.dir={tmp_path / 'run'}",
                *SMALL], cwd=tmp_path)
    assert out.returncode == 3, out.stderr[-3000:]
    verdict = json.loads((tmp_path / "run" / "acceptance.json").read_text())
    assert verdict["passed"] is False
    assert verdict["checks"]["min_reward_std"] == {"value": 0.0, "threshold": 1.0, "passed": False,
                                                   "metrics": ["rollout/reward_group_std"]}
    assert "min_reward_std FAIL 0 >= 1" in out.stderr


def test_cli_multirun_writes_one_dir_per_job(tmp_path):
    out = _run([sys.executable, str(ROOT / "run.py"), "-m", "reward=dummy", "strategy.clip_range=1e-3,2e-3",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMALL], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for job in ("0", "1"):
        cfg = OmegaConf.load(tmp_path / "sweep" / job / "config.yaml")
        assert (tmp_path / "sweep" / job / "metrics.jsonl").is_file()
        assert cfg.strategy.clip_range == (1e-3 if job == "0" else 2e-3)


def test_torchrun_two_ranks_one_run_dir(tmp_path):
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(ROOT / "run.py"), "strategy=fed_grpo", "reward=dummy", f"hydra.run.dir={tmp_path / 'run'}",
                *SMALL], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "only rank 0 may create files"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1], "one line per iteration, from rank 0 only"
    assert (tmp_path / "run" / "checkpoint_latest.pth").is_file()
    # Rank 0 wrote the best checkpoint; no rank may claim it was never logged.
    assert (tmp_path / "run" / "checkpoint_best.pth").is_file()
    assert "never logged" not in out.stderr, out.stderr[-2000:]


def experiments() -> list[str]:
    return sorted(p.relative_to(CONF / "experiment").with_suffix("").as_posix()
                  for p in (CONF / "experiment").rglob("*.yaml"))


def tiny(experiment: str) -> list[str]:
    """Overrides that make any experiment one short iteration, read off its composed config."""
    cfg = compose_with(f"experiment={experiment}")
    out = ["trainer.max_iterations=1", "trainer.progress=false"]
    if "num_steps" in cfg.model:  # EDM: fewer sampling steps (a language model has none)
        out += ["model.num_steps=10", f"model.skip_prefix={min(cfg.model.skip_prefix, 5)}"]
    if "group_size" in cfg.dataloader:  # prompts x group
        out += ["dataloader.batch_size=4", "dataloader.group_size=2", "trainer.micro_batch_size=4"]
    else:  # supervised mini-batches
        out += ["dataloader.batch_size=8"]
    small = {"num_samples": 4, "batch_size": 4, "max_rows": 4, "num_molecules": 2, "samples_per_molecule": 2,
             "samples_per_reference": 1, "diffusion_samples": 2, "sampling_steps": 5, "samples_per_prompt": 1}  # whichever of these the recipe's evaluator takes
    if cfg.get("evaluator") is not None:
        out += [f"evaluator.{key}={value}" for key, value in small.items() if key in cfg.evaluator]
    if cfg.reward.get("shaping") is not None:
        out += ["reward.shaping.scheduler.start_step=6"]  # score the last 4 of 10 steps
    return out


@pytest.mark.parametrize("experiment", experiments())
def test_every_experiment_runs_end_to_end(tmp_path, experiment):
    """Each recipe as a user starts it, one short iteration: real rewards (xTB in worker processes),
    filters and evaluators; every failure counted, nothing silently zero."""
    out = _run([sys.executable, str(ROOT / "run.py"), f"experiment={experiment}", f"hydra.run.dir={tmp_path / 'run'}",
                *tiny(experiment)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    evaluates_start = saved.get("evaluator") is not None and saved.trainer.eval_interval and saved.trainer.eval_at_start
    assert [r["iteration"] for r in rows] == ([-1, 0] if evaluates_start else [0])
    assert saved.name == compose_with(f"experiment={experiment}").name  # the recipe, not the default job
    last = rows[-1]
    if saved.strategy._target_.endswith("FedGRPOStrategy"):
        for channel in saved.strategy.channel_weights:  # the recipe's weights name channels its reward emits
            assert f"reward/{channel}" in last, channel
    if saved.get("evaluator") is not None and "num_samples" in saved.evaluator:
        assert last["eval/num_samples"] == 4
    elif saved.get("evaluator") is not None and "diffusion_samples" in saved.evaluator:  # structures vs truth
        assert 0.0 <= last["eval/ca_lddt"] <= 1.0 and math.isfinite(last["eval/distogram_ce"])
    elif saved.get("evaluator") is not None and "samples_per_prompt" in saved.evaluator:  # masked-LM reward recipe
        assert 0.0 <= last["eval/valid_frac"] <= 1.0 and math.isfinite(last["eval/mlm_reward"])
    elif saved.get("evaluator") is not None:  # language models: held-out loss and / or prompted completions
        assert 0.0 <= last["eval/parse_rate"] <= 1.0
        assert "max_rows" not in saved.evaluator or math.isfinite(last["eval/loss"])
    if saved.trainer.get("sample_table_interval"):  # iteration 0 always gets a table
        table = [json.loads(x) for x in (tmp_path / "run" / "samples" / "iteration_000000.jsonl").read_text().splitlines()]
        assert table and all("advantage" in row and "group" in row for row in table)
    if saved.reward.get("shaping") is not None:  # the ELIGN recipe: PBRS energy shaping on z0 predictions
        assert last["reward/shaping_evaluations"] > 0
        for key in ("rollout/validity", "rollout/molecule_stability", "reward/ff_ok_frac", "timing/reward"):
            assert key in last, key
        assert saved.strategy.advantage_mode == "pbrs_return_to_go" and saved.model.record_z0_pred


def test_cli_refuses_a_composition_that_mixes_domains(tmp_path):
    # A second domain's option, added through Hydra's search path as a user's own config folder would be.
    (tmp_path / "extra" / "reward" / "molgen").mkdir(parents=True)
    (tmp_path / "extra" / "reward" / "molgen" / "fake.yaml").write_text(
        "_target_: elign.engine.rollout.ConstantReward\nvalues: {pll: 0.0}\n")
    out = _run([sys.executable, str(ROOT / "run.py"), "reward=molgen/fake", f"hydra.searchpath=[file://{tmp_path / 'extra'}]",
                f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "reward='molgen/fake'" in out.stderr and "'edm'" in out.stderr and "'molgen'" in out.stderr
    assert not (tmp_path / "run" / "config.yaml").exists(), "refused before anything was built or written"


def test_joblib_launcher_runs_a_two_job_sweep(tmp_path):
    out = _run([sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                "reward=dummy", "filter=none", "model=edm/small", "model.dynamics.num_layers=1", "model.dynamics.hidden_nf=8",
                "strategy.clip_range=1e-3,2e-3", f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMALL],
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr  # the joblib launcher ran the jobs, not the basic one
    for job, clip in (("0", 1e-3), ("1", 2e-3)):
        cfg = OmegaConf.load(tmp_path / "sweep" / job / "config.yaml")
        assert cfg.strategy.clip_range == clip
        assert len((tmp_path / "sweep" / job / "metrics.jsonl").read_text().splitlines()) == 2


def test_submitit_local_launcher_runs_a_job_the_way_slurm_would(tmp_path):
    """submitit pickles the job and runs it in a fresh Python (the SLURM path minus the queue); the
    xTB worker pool (spawn processes) must start inside it."""
    out = _run([sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                "model=edm/small", "model.dynamics.num_layers=1", "model.dynamics.hidden_nf=8", "model.checkpoint=null",
                "dataloader.batch_size=4", "dataloader.group_size=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                *SMALL[:1], *SMALL[2:],
                "trainer.max_iterations=1"], cwd=tmp_path, env_extra={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "sweep" / ".submitit").iterdir()), "submitit ran the job"
    row = json.loads((tmp_path / "sweep" / "0" / "metrics.jsonl").read_text())
    assert "reward/ff_ok_frac" in row and "timing/reward" in row  # the xTB reward ran (in its worker pool)


def test_cli_prints_composed_config(tmp_path):
    out = _run([sys.executable, str(ROOT / "run.py"), "--cfg", "job", "reward=edm/mmff"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = OmegaConf.create(out.stdout)
    assert cfg.reward.force_field._target_ == "elign.forcefield.mmff.MMFFForceField"
    assert not (tmp_path / "outputs").exists(), "--cfg must not start a run"


def test_default_job_starts_from_the_shipped_base_model():
    import torch

    from elign.edm.policy import resolve_package_path

    cfg = compose_with()
    assert cfg.model.checkpoint.startswith("package:elign/edm/weights/")
    shipped = torch.load(resolve_package_path(cfg.model.checkpoint), weights_only=True)
    policy = run_module.build(cfg, "model")
    loaded = policy.module.state_dict()
    assert shipped.keys() == loaded.keys()
    assert all(torch.equal(loaded[k], v) for k, v in shipped.items())


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its contents (a dry run must change none of them)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_dry_run_of_the_boltz_recipe_prints_shapes_and_writes_nothing(tmp_path):
    """Every group built, one batch drawn, the wiring, its shapes and BoltzPolicy.describe printed;
    no run directory (Hydra's included), nothing anywhere under the working directory."""
    pytest.importorskip("boltz")
    out = _run([sys.executable, str(ROOT / "run.py"), "experiment=boltz/sft_lora", "dry_run=true",
                "dataloader.max_tokens=32", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (tmp_path / "run").exists(), "a dry run creates no run directory"
    assert list(tmp_path.iterdir()) == [], "a dry run writes nothing"
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines() if line.startswith("  ")}
    assert lines["model"] == "boltz/tiny -> boltz_ft.policy.BoltzPolicy"
    assert lines["dataloader"].endswith("boltz_ft.dataset.StructureBatches")
    assert lines["evaluator"].endswith("boltz_ft.evaluate.StructureEvaluator")
    assert lines["acceptance"] == "default -> elign.engine.acceptance.AcceptanceReport"
    assert lines["strategy"].endswith("SupervisedStrategy")
    assert lines["inputs/res_type"] == "(1, 32, 33) int64"
    assert lines["targets/coords"] == "(1, 1, 512, 3) float32"  # 16 padded atoms per token
    assert lines["outputs/pdistogram"].startswith("(1, 32, 32, 1, ")
    assert lines["outputs/s"].startswith("(1, 32, ") and lines["outputs/z"].startswith("(1, 32, 32, ")
    assert lines["outputs/sample_atom_coords"] == "(2, 512, 3)"
    assert math.isfinite(float(lines["losses/loss"])) and math.isfinite(float(lines["losses/distogram"]))
    assert 0 < int(lines["parameters/trainable"]) < int(lines["parameters/total"])  # LoRA adapters only
    assert f"run directory: {tmp_path / 'run'} (a run would create it)" in out.stdout


def test_dry_run_of_another_domain_prints_the_batch_and_writes_nothing(tmp_path):
    """A policy without describe(): the batch's shapes only; the default (time-stamped) run dir is
    named, not created."""
    out = _run([sys.executable, str(ROOT / "run.py"), "experiment=edm/fed_grpo", "dry_run=true"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(tmp_path.iterdir()) == [], "a dry run writes nothing (no outputs/, no .hydra, no log)"
    assert "  model       edm/base -> elign.edm.policy.EDMPolicy" in out.stdout
    assert "  evaluator   null -> null" in out.stdout
    assert "  batch  (2,) int64" in out.stdout  # 16 molecules = 2 prompts x group of 8
    assert "describe" not in out.stdout
    assert f"run directory: {tmp_path / 'outputs'}/" in out.stdout


def test_dry_run_keeps_start_up_errors(tmp_path):
    """A bad value and a directory that holds a run still stop a dry run with exit code 2, and the
    directory is left as it was."""
    out = _run([sys.executable, str(ROOT / "run.py"), "experiment=edm/fed_grpo", "dry_run=true",
                "trainer.max_iterations=0", f"hydra.run.dir={tmp_path / 'new'}"], cwd=tmp_path)
    assert out.returncode == 2 and "trainer.max_iterations" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text('{"iteration": 0}\n')
    before = _tree(tmp_path)
    out = _run([sys.executable, str(ROOT / "run.py"), "experiment=edm/fed_grpo", "dry_run=true",
                f"hydra.run.dir={tmp_path / 'old'}"], cwd=tmp_path)
    assert out.returncode == 2 and "already holds a run" in out.stderr, out.stderr[-2000:]
    assert _tree(tmp_path) == before


def test_dry_run_under_torchrun_prints_once_and_writes_nothing(tmp_path):
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(ROOT / "run.py"), "experiment=edm/fed_grpo", "reward=dummy", "dry_run=true",
                f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("dry run:") == 1 and out.stdout.count("wiring:") == 1, "rank 0 prints, only it"
    assert list(tmp_path.iterdir()) == []
