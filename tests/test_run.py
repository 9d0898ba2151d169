"""Config composition for every option of every group, `_target_` imports, key-naming errors,
and the command line: main job, multirun sweep, torchrun with two ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

import run as run_module
from elign.engine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def targets(node):
    if isinstance(node, DictConfig):
        for key in node.keys():
            if key == "_target_":
                yield node[key]
            else:
                yield from targets(node._get_node(key))
    elif isinstance(node, ListConfig):
        for item in node:
            yield from targets(item)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_every_target_imports(group, option):
    cfg = compose_with(f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    found = list(targets(cfg))
    assert found, "composed config has no _target_"
    for target in found:
        assert get_object(target) is not None, target


def test_every_yaml_key_has_a_comment():
    for path in CONF.rglob("*.yaml"):
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "-", "_target_", "_partial_", "_convert_", "defaults")):
                continue
            if stripped.endswith(":") or path.parent.name == "hydra":
                continue  # a nested block, or Hydra's own settings
            assert "#" in line, f"{path.relative_to(ROOT)}:{lineno} has no comment: {stripped}"


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
    # PBRS per-step advantages cannot be combined from per-sample gradient sums
    ("trainer.fused_rollout=true strategy.advantage_mode=pbrs_return_to_go", "trainer.fused_rollout"),
])
def test_cli_bad_value_exits_with_key_message(tmp_path, override, key):
    out = _run([sys.executable, str(ROOT / "run.py"), *override.split(), f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert key in out.stderr


SMALL = ["trainer.max_iterations=2", "model.num_steps=10", "model.skip_prefix=5", "trainer.progress=false"]


def test_cli_job_writes_run_files(tmp_path):
    out = _run([sys.executable, str(ROOT / "run.py"), "strategy=fed_grpo", "reward=dummy",
                f"hydra.run.dir={tmp_path / 'run'}", *SMALL], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "checkpoint_latest.pth", "checkpoint_best.pth"):
        assert (run_dir / name).is_file(), name
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


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


def test_cli_pbrs_xtb_recipe_end_to_end(tmp_path):
    """The ELIGN recipe: xTB forces/energies in worker processes, PBRS shaping of the energy on the
    predicted clean molecules, RDKit filter; every failure counted, nothing silently zero."""
    out = _run([sys.executable, str(ROOT / "run.py"), "experiment=elign_pbrs_xtb", f"hydra.run.dir={tmp_path / 'run'}",
                "reward.shaping.scheduler.start_step=6", *SMALL], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    for key in ("reward/force", "reward/energy", "reward/shaping_evaluations", "rollout/validity",
                "rollout/molecule_stability", "reward/ff_ok_frac", "timing/reward"):
        assert key in last, key
    assert last["reward/shaping_evaluations"] > 0
    cfg = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert cfg.strategy.advantage_mode == "pbrs_return_to_go" and cfg.model.record_z0_pred


def test_cli_prints_composed_config(tmp_path):
    out = _run([sys.executable, str(ROOT / "run.py"), "--cfg", "job", "reward=mmff"], cwd=tmp_path)
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
