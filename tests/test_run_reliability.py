"""run.py as users and mistakes drive it: one writer per run directory, no silent mixing of runs,
torn files after a kill, and one-line errors (exit code 2) that name the key or the file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elign.engine.checkpoint import LATEST, RESUME_KEYS, atomic_save
from elign.engine.rundir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
# The 2-minute recipe, shortened: these tests exercise run.py, not the default ELIGN recipe.
SMALL = ["experiment=edm/fed_grpo", "reward=dummy", "trainer.max_iterations=2", "model.num_steps=10",
         "model.skip_prefix=5", "trainer.progress=false"]
#: What Hydra itself writes into a run directory before run.py's code runs.
HYDRA_FILES = {".hydra", "run.log"}


def run_py(*args, cwd, timeout=600, torchrun=False):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return subprocess.run([*launcher, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def iterations(run_dir):
    return [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def error_lines(out):
    return [line for line in out.stderr.splitlines() if line.strip()]


def test_a_second_writer_is_refused_with_the_directory_named(tmp_path):
    run_dir = tmp_path / "run"
    holder = RunDirectory(run_dir)  # another live run (this process) holds the directory
    holder.lock()
    try:
        out = run_py(*SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    finally:
        holder.release()
    assert out.returncode == 2, out.stderr[-2000:]
    assert error_lines(out) == [f"error: run directory {run_dir}: another process (pid {os.getpid()}) is running in "
                                "it; wait for it to finish or choose another hydra.run.dir"]
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "metrics.jsonl").exists()


def test_run_directory_lifecycle_refuse_resume_torn_tail_overwrite(tmp_path):
    """A directory left by a run killed before its first checkpoint (config, two metrics lines, a
    checkpoint temporary cut short), then: a fresh start is refused; resume=auto starts over at
    iteration 0 without appending; a torn metrics line is dropped on the next resume; overwrite
    replaces the run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: earlier\n")
    (run_dir / "metrics.jsonl").write_text('{"iteration": 0}\n{"iteration": 1}\n')
    stale = run_dir / f".{LATEST}.x1y2z3w4.tmp"
    stale.write_bytes(b"PK half a checkpoint")

    refused = run_py(*SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    [line] = error_lines(refused)
    assert line.startswith(f"error: run directory {run_dir}: already holds a run (config.yaml, metrics.jsonl)")
    assert "trainer.resume=auto" in line and "overwrite=true" in line
    assert (run_dir / "config.yaml").read_text() == "name: earlier\n"

    resumed = run_py(*SMALL, "trainer.resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert iterations(run_dir) == [0, 1], "restarted at 0: the earlier attempt's lines must not stay"
    assert not stale.exists(), "a killed checkpoint write's temporary is cleaned up"
    assert (run_dir / LATEST).is_file()

    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 2, "reward/tot')  # killed mid-write after the checkpoint
    torn = run_py(*SMALL[:-1], "trainer.max_iterations=3", "trainer.progress=false", "trainer.resume=auto",
                  f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert torn.returncode == 0, torn.stderr[-3000:]
    assert f"{run_dir / 'metrics.jsonl'}:3: dropping a torn last line" in torn.stderr
    assert iterations(run_dir) == [0, 1, 2]

    replaced = run_py(*SMALL, "overwrite=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert iterations(run_dir) == [0, 1]


def _resume_file(tmp_path, damage):
    path = tmp_path / "resume.pth"
    if damage == "missing":
        return path
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        atomic_save({k: torch.zeros(64) for k in RESUME_KEYS}, path)
        path.write_bytes(path.read_bytes()[:-200])  # truncated: the zip's central directory is gone
    return path


@pytest.mark.parametrize("case", ["device", "resume-missing", "resume-empty", "resume-truncated", "resume-random",
                                  "model-checkpoint", "lr", "seed", "unknown-key", "nan"])
def test_bad_start_exits_2_with_one_line_naming_the_key_or_file(tmp_path, case):
    run_dir = tmp_path / "run"
    names = {"device": "device", "lr": "trainer.optimizer.lr", "seed": "seed", "unknown-key": "trainer.lerning_rate",
             "nan": "trainer.failure_penalty"}
    args = {"device": ["device=cuda"], "lr": ["trainer.optimizer.lr=-1"], "seed": ["seed=abc"],
            "unknown-key": ["+trainer.lerning_rate=1e-3"], "nan": ["trainer.failure_penalty=nan"]}.get(case, [])
    if case == "device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if case.startswith("resume"):
        path = _resume_file(tmp_path, case.split("-")[1])
        args, names[case] = [f"trainer.resume={path}"], "trainer.resume"
    if case == "model-checkpoint":
        path = tmp_path / "weights.pth"
        path.write_bytes(b"\x80\x02not a checkpoint")
        args, names[case] = [f"model.checkpoint={path}"], "model.checkpoint"
    out = run_py(*SMALL, *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    [line] = error_lines(out)
    assert line.startswith(f"Config error: invalid config value {names[case]}="), line
    if case.startswith(("resume", "model")):
        assert str(path) in line
    # Nothing of ours is written before the check: only what Hydra made itself (the model is built
    # after the run directory is locked, so its check may leave the unlocked lock file).
    allowed = HYDRA_FILES | ({".run.lock"} if case == "model-checkpoint" else set())
    assert {p.name for p in run_dir.iterdir()} <= allowed


def test_torchrun_refusal_stops_every_rank(tmp_path):
    """Only rank 0 claims the directory; when it refuses, the other rank must stop too, not wait
    forever in the next collective."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"iteration": 0}\n')
    out = run_py(*SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path, torchrun=True, timeout=300)
    assert out.returncode != 0
    refusals = [line for line in out.stderr.splitlines() if line.startswith(f"error: run directory {run_dir}")]
    assert len(refusals) == 2, out.stderr[-3000:]  # rank 0's message, printed by both ranks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# -- NaN and ±inf in the constructors of the groups: each must name the key ---------------------------

import math  # noqa: E402

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import run as run_module  # noqa: E402
from elign.engine.errors import ConfigError  # noqa: E402

#: (override, subtree whose numeric keys are checked). ConstantReward (reward=dummy) and the trainer and
#: strategy constructors are checked by run.py's whole-config pass; their constructors are the lead's.
SUBTREES = [("model=edm/small", "model"), ("dataloader=edm/qm9_nodes", "dataloader"),
            ("dataloader=edm/qm9_sample", "dataloader"), ("filter=edm/chem", "filter"), ("reward=edm/xtb", "reward"),
            ("reward=edm/mmff", "reward"), ("reward=edm/uma", "reward"), ("evaluator=edm/sample", "evaluator"),
            ("experiment=edm/elign_pbrs_xtb", "reward.shaping"), ("trainer=default", "trainer.lr_schedule")]


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _numeric_leaves(node, path):
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            yield from _numeric_leaves(child, f"{path}.{key}")
        elif isinstance(node[key], (int, float)) and not isinstance(node[key], bool):
            yield path, key  # the key as it is (atom_refs_ev has integer keys)


def _owner(cfg, leaf):
    """The nearest node with a _target_ above ``leaf``, and its dotted path."""
    parts = leaf.split(".")[:-1]
    while parts and "_target_" not in OmegaConf.select(cfg, ".".join(parts)):
        parts.pop()
    return ".".join(parts)


@pytest.mark.parametrize("override,subtree", SUBTREES)
def test_every_numeric_key_rejects_nan_and_inf_naming_itself(override, subtree):
    cfg = _compose(override)
    leaves = list(_numeric_leaves(OmegaConf.select(cfg, subtree), subtree))
    assert leaves
    accepted = []
    for parent, key in leaves:
        leaf = f"{parent}.{key}"
        for bad in (math.nan, math.inf):
            broken = cfg.copy()
            OmegaConf.select(broken, parent)[key] = bad
            owner = _owner(broken, leaf)
            node = OmegaConf.select(broken, owner)
            if "force_field" in node and not leaf.startswith(f"{owner}.force_field"):
                # the reward's own keys: a UMA model name cannot be loaded here, and is not what is tested
                node.force_field = {"_target_": "elign.forcefield.dummy.DummyForceField"}
            try:
                run_module.build_node(node, owner)
                accepted.append(f"{leaf}={bad} accepted")
            except ConfigError as exc:
                if exc.key != leaf:
                    accepted.append(f"{leaf}={bad} reported as {exc.key}")
    assert not accepted, accepted


@pytest.mark.parametrize("override", ["reward=edm/xtb", "reward=edm/mmff", "reward=edm/uma", "evaluator=edm/sample",
                                      "experiment=edm/elign_pbrs_xtb", "experiment=edm/elign"])
def test_every_force_field_node_states_the_physical_limits(override):
    """The limits have defaults in the signatures; the configs must still say what they are."""
    cfg = _compose(override)
    nodes = [OmegaConf.select(cfg, path) for path in ("reward.force_field", "evaluator.force_field")]
    nodes = [n for n in nodes if n is not None and str(n._target_).startswith("elign.forcefield.")]
    assert nodes
    for node in nodes:
        assert node.min_distance_angstrom == 0.5 and node.max_force_ev_per_angstrom == 1000.0


# -- run.py's start-up checks, in process ---------------------------------------------------------


def _key_of(fn, *args):
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return info.value


def test_validate_names_unknown_missing_and_unset_keys():
    assert _key_of(run_module.validate, _compose("+trainer.lerning_rate=1")).key == "trainer.lerning_rate"
    unknown = _key_of(run_module.validate, _compose("+reward.force_field.acuracy=1"))
    assert unknown.key == "reward.force_field.acuracy" and "accuracy" in unknown.allowed
    assert "policy" not in _key_of(run_module.validate, _compose("+trainer.x=1")).allowed, "live objects are no keys"
    assert _key_of(run_module.validate, _compose("~reward.force_field.accuracy")).key == "reward.force_field.accuracy"
    assert _key_of(run_module.validate, _compose("dataloader=edm/qm9")).key == "dataloader.dataset.path"  # left ???
    bad_target = _key_of(run_module.validate, _compose("model.dynamics._target_=elign.edm.egnn.Nope"))
    assert bad_target.key == "model.dynamics._target_"
    run_module.validate(_compose())  # the default job passes
    run_module.validate(_compose("experiment=edm/elign_pbrs_xtb"))


@pytest.mark.parametrize("override,key", [
    ("seed=1.5", "seed"), ("device=tpu", "device"), ("overwrite=maybe", "overwrite"),
    ("trainer.optimizer.betas=[0.9,2.0]", "trainer.optimizer.betas"), ("trainer.optimizer.eps=-1", "trainer.optimizer.eps"),
    ("trainer.optimizer.lr=nan", "trainer.optimizer.lr"), ("trainer.lr_schedule.warmup_steps=-1", "trainer.lr_schedule.warmup_steps"),
    ("trainer.max_grad_norm=inf", "trainer.max_grad_norm"), ("strategy.channel_weights.force=nan", "strategy.channel_weights.force"),
    ("trainer.resume=''", "trainer.resume"),
])
def test_validate_rejects_before_anything_is_built(override, key):
    assert _key_of(run_module.validate, _compose(override)).key == key


def test_error_lines_are_one_line():
    assert run_module.error_line(ConfigError("k", "a\nb", "x\ny")) == "Config error: invalid config value k='a\\nb'; allowed: x y"
