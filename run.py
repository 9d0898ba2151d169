"""Entry point: the only place that sees the whole config.

    python run.py                                          # default job
    python run.py strategy=fed_grpo reward=dummy           # pick options per group
    python run.py -m reward=dummy strategy.clip_range=1e-3,2e-3   # Hydra multirun sweep
    torchrun --standalone --nproc_per_node=2 run.py ...    # data-parallel (gloo on CPU)
    python run.py --cfg job                                # print the composed config
    python run.py experiment=boltz/sft_lora dry_run=true   # build everything, draw one batch, print, write nothing

Each config group is instantiated through its ``_target_`` and the objects are handed to the
trainer. A bad value stops start-up (exit code 2) with one line naming the full key or the file,
before the model is built and before anything is written to the run directory. A run holds a
lock on its directory; a fresh run refuses a directory that holds a run unless told to resume
(``trainer.resume=auto``) or to replace it (``overwrite=true``).

With ``acceptance=default`` rank 0 checks the finished run's ``metrics.jsonl`` (NaN losses, the loss
slope, RL reward spread), writes ``acceptance.json`` and prints one summary line; with
``acceptance.fail_exit=true`` a failed check ends the run with exit code 3, on every rank.
``dry_run=true`` (on the command line of a single run) builds every group as a run would, draws one
batch (iteration 0's), prints the wiring, the batch's shapes and the policy's ``describe(batch)`` if it
has one, and exits 0 without creating the run directory or writing anything (Hydra included).
Exit codes: 0 success, 2 a config or start-up error, 3 a failed acceptance check, 1 anything else.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from elign.engine.acceptance import FAILED_EXIT_CODE, AcceptanceReport, summary_line
from elign.engine.checkpoint import check_resume, missing_best_warning
from elign.engine.config_checks import (check_compatible, check_domains, check_finite_values, check_keys,
                                        check_optimizer)
from elign.engine.distributed import DistInfo, broadcast_object, check_device, init_distributed, shutdown
from elign.engine.errors import ConfigError, DataFormatError, RunDirectoryError, check_int
from elign.engine.memory import configure_host_allocator
from elign.engine.rundir import CONFIG_FILE, RunDirectory

GROUPS = ("dataloader", "strategy", "model", "reward", "filter", "logger", "acceptance")
#: Constructor arguments that run.py passes as live objects, not from the config.
LIVE_ARGUMENTS = {"trainer": ("policy", "strategy", "dataloader", "run_dir", "dist", "reward", "filter", "logger",
                              "evaluator", "run_config")}


#: Hydra overrides under which Hydra creates no run directory ('.' exists), saves no .hydra/ and opens no log file.
HYDRA_WRITES_NOTHING = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                        "hydra/hydra_logging=disabled")
_RUN_DIR_ARGS = ("hydra.run.dir=", "hydra.output_subdir=")
#: The command line's own run-directory arguments that :func:`_hydra_writes_nothing` replaced.
_replaced_args: list[str] = []
#: Whether the command line asked for a dry run and Hydra was told to write nothing for it.
_dry_run_ready = False


def dry_run_requested(argv: list[str]) -> bool:
    """Whether ``argv`` is a single run (no ``-m``) whose last ``dry_run=`` override is true."""
    if any(a in ("-m", "--multirun") for a in argv):
        return False
    values = [a.split("=", 1)[1] for a in argv if re.match(r"\+{0,2}dry_run=", a)]
    return bool(values) and values[-1].strip().lower() == "true"  # Hydra's grammar: true in any case


def _hydra_writes_nothing() -> None:
    """Hydra creates the run directory, saves ``.hydra/`` into it and opens its log file before main()
    runs. Two kinds of process must do none of that, so they get a run dir of '.', no .hydra/ folder
    and no log file: under torchrun every rank but 0 (rank 0's dir is broadcast), and a dry run on
    every rank (the directory a run would use is recomposed from the command line's own arguments,
    see :func:`planned_run_dir`)."""
    global _dry_run_ready
    _dry_run_ready = dry_run_requested(sys.argv[1:])
    if int(os.environ.get("RANK", "0")) == 0 and not _dry_run_ready:
        return
    _replaced_args[:] = [a for a in sys.argv[1:] if a.startswith(_RUN_DIR_ARGS)]
    sys.argv = [a for a in sys.argv if not a.startswith(_RUN_DIR_ARGS)] + list(HYDRA_WRITES_NOTHING)


def _key_path(node: Any, key: str, value: Any, prefix: str) -> str:
    """Full dotted path of the constructor argument ``key`` inside a config group."""
    found: list[tuple[str, Any]] = []

    def walk(n: Any, path: str) -> None:
        if isinstance(n, DictConfig):
            for k in n.keys():
                child = n._get_node(k)
                sub = f"{path}.{k}" if path else str(k)
                if str(k) == key:
                    found.append((sub, OmegaConf.select(n, str(k), default=None)))
                walk(child, sub)

    def same(a: Any, b: Any) -> bool:
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))

    walk(node, prefix)
    exact = [p for p, v in found if same(v, value)]
    return (exact or [p for p, _ in found] or [f"{prefix}.{key}"])[0]


def build(cfg: DictConfig, group: str, **kwargs: Any) -> Any:
    """Instantiate one config group; a ConfigError comes back with its full key (``model.num_steps``).

    ``kwargs`` are live objects (policy, DistInfo, ...): they are passed to the constructor
    directly, never through Hydra, which would try to convert them into config nodes."""
    return build_node(cfg[group], group, **kwargs)


def build_node(node: DictConfig, prefix: str, **kwargs: Any) -> Any:
    """:func:`build` for any config node with a ``_target_``; ``prefix`` is its dotted key."""
    try:
        if kwargs:
            return instantiate(node, _partial_=True)(**kwargs)
        return instantiate(node)
    except (InstantiationException, ConfigError) as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise ConfigError(_key_path(node, cause.key, cause.value, prefix), cause.value, cause.allowed) from None


def validate(cfg: DictConfig) -> None:
    """Checks that need neither the model nor the run directory; they run first, on every rank."""
    check_int("seed", cfg.seed)
    check_device(cfg.device)
    for key in ("overwrite", "dry_run"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(key, cfg[key], "true or false")
    resume = cfg.trainer.get("resume")
    if resume is not None and (not isinstance(resume, str) or not resume):
        raise ConfigError("trainer.resume", resume, "null, auto, or the path of a checkpoint or run directory")
    check_finite_values(cfg)
    for group in cfg.keys():
        check_keys(cfg._get_node(str(group)), str(group), LIVE_ARGUMENTS.get(str(group), ()))
    check_optimizer(cfg)
    build_node(cfg.trainer.lr_schedule, "trainer.lr_schedule")


class StartupFailure(Exception):
    """A user error raised on rank 0 (at start-up, or in the acceptance report after the run),
    re-raised on every rank with rank 0's message."""


def on_main_rank(dist: DistInfo, step: Callable[[], Any]) -> Any:
    """Run ``step`` on rank 0 only; if it fails with a user error, every rank stops with the same
    message (instead of the others waiting forever in the next collective)."""
    result, message = None, None
    if dist.is_main:
        try:
            result = step()
        except (ConfigError, DataFormatError, RunDirectoryError) as exc:
            message = error_line(exc)
    message = broadcast_object(message, dist)
    if message is not None:
        raise StartupFailure(message)
    return result


def error_line(exc: BaseException) -> str:
    """The one line a user error prints."""
    if isinstance(exc, StartupFailure):
        return str(exc)
    text = " ".join(str(exc).split())  # one line, whatever the cause's message held
    return f"Config error: {text}" if isinstance(exc, ConfigError) else f"error: {text}"


def claim_run_dir(cfg: DictConfig, run_dir: Path) -> RunDirectory:
    """Rank 0: check the resume checkpoint (before anything is written), lock the run directory
    and claim it for this run (see :mod:`elign.engine.rundir`)."""
    resume = cfg.trainer.get("resume")
    check_resume(run_dir, resume)
    directory = RunDirectory(run_dir)
    directory.lock()
    try:
        directory.claim(resume, bool(cfg.get("overwrite", False)))
    except BaseException:
        directory.release()
        raise
    return directory


def build_trainer(cfg: DictConfig, dist: DistInfo, run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Build every group and the trainer (which writes nothing before ``fit``; rank 0 creates
    ``run_dir`` if missing). Returns the trainer and ``{group: built object}`` (None for a null group)."""
    torch.manual_seed(cfg.seed)  # model initialisation; iterations reseed themselves
    dataloader = build(cfg, "dataloader")
    strategy = build(cfg, "strategy")
    check_compatible(cfg, dataloader, strategy)
    # Supervised recipes need no reward or filter (null groups); RL strategies refuse to start without a reward.
    objects = {g: build(cfg, g) if cfg.get(g) is not None else None for g in ("reward", "filter", "logger")}
    objects["evaluator"] = build(cfg, "evaluator") if cfg.get("evaluator") is not None else None
    policy = build(cfg, "model").to(dist.device)
    trainer = build(cfg, "trainer", policy=policy, strategy=strategy, dataloader=dataloader, run_dir=str(run_dir),
                    dist=dist, **objects)
    # Set after instantiation: passed through instantiate(), Hydra would try to build its _target_s.
    trainer.run_config = OmegaConf.to_container(cfg, resolve=True)
    return trainer, {"model": policy, "strategy": strategy, "dataloader": dataloader, **objects}


def fit(cfg: DictConfig, dist: DistInfo, run_dir: Path) -> dict[str, float]:
    """Build every group and run the trainer. Every object that holds the process group (DDP's
    reducer) lives in this frame only, so it is freed when this returns, before the group is
    destroyed: freed afterwards, the reducer would run the gloo group's destructor while holding
    the GIL, and that destructor waits for a worker thread that needs the GIL (a hang at exit,
    seen under load)."""
    trainer, _ = build_trainer(cfg, dist, run_dir)
    if dist.is_main:
        OmegaConf.save(cfg, run_dir / CONFIG_FILE, resolve=True)
    return trainer.fit()


def planned_run_dir() -> Path:
    """The run directory a run of this command line would use (a dry run told Hydra '.'): the config
    recomposed with the command line's own overrides, ``hydra.run.dir`` resolved as Hydra does."""
    hydra_cfg = HydraConfig.get()
    overrides = [*hydra_cfg.overrides.task, *(o for o in hydra_cfg.overrides.hydra if o not in HYDRA_WRITES_NOTHING),
                 *_replaced_args]
    composed = compose(config_name=hydra_cfg.job.config_name, overrides=overrides, return_hydra_config=True)
    return Path(os.path.abspath(str(composed.hydra.run.dir)))


def check_run_dir(cfg: DictConfig, run_dir: Path) -> str:
    """Rank 0 of a dry run: what :func:`claim_run_dir` checks, read-only (the resume checkpoint, a
    fresh run into a directory that holds one); returns a line on what a run would do there."""
    resume = cfg.trainer.get("resume")
    checkpoint = check_resume(run_dir, resume)
    RunDirectory(run_dir).check(resume, bool(cfg.get("overwrite", False)))
    if checkpoint is not None:
        return f"{run_dir} (a run would resume from {checkpoint})"
    held = RunDirectory(run_dir).run_files()
    state = "holds a run; overwrite=true: a run would delete it" if held else \
        "exists" if run_dir.is_dir() else "a run would create it"
    return f"{run_dir} ({state})"


def dry_run(cfg: DictConfig, dist: DistInfo, acceptance: AcceptanceReport | None) -> None:
    """Build every group as :func:`fit` does, draw iteration 0's batch, and print (rank 0) the wiring,
    the batch's shapes and the policy's ``describe(batch)`` if it has one; nothing is written.

    The trainer gets Hydra's output directory, which :func:`_hydra_writes_nothing` made '.': it
    exists, so the trainer's ``mkdir`` is a no-op, and nothing writes there since ``fit`` never runs."""
    from elign.engine.dryrun import report
    from elign.engine.trainer import seed_iteration

    run_dir_line = on_main_rank(dist, lambda: check_run_dir(cfg, planned_run_dir()))
    here = Path(HydraConfig.get().runtime.output_dir)
    trainer, objects = build_trainer(cfg, dist, here)
    seed_iteration(cfg.seed, 0, dist.rank)  # the batch iteration 0 of a run would draw
    batch = next(objects["dataloader"])
    if dist.is_main:
        choices = HydraConfig.get().runtime.choices
        wiring = {group: (choices.get(group), obj) for group, obj in
                  {**objects, "acceptance": acceptance, "trainer": trainer}.items()}
        describe = getattr(objects["model"], "describe", None)
        description = None
        if callable(describe):
            with torch.random.fork_rng():
                description = describe(batch)
        sys.stdout.write(report(run_dir_line, wiring, batch, description, "describe") + "\n")
        sys.stdout.flush()
    broadcast_object(None, dist)  # every rank waits for rank 0's report, then all leave together


def judge(acceptance: AcceptanceReport | None, dist: DistInfo, run_dir: Path) -> bool | None:
    """Rank 0 runs the acceptance checks on the finished run (writes ``acceptance.json``, prints the
    summary line); every rank gets rank 0's verdict, so that all of them exit with the same status.
    None when the report is off."""
    if acceptance is None or not acceptance.enabled:
        return None

    def check() -> bool:
        verdict = acceptance(run_dir)
        say(summary_line(verdict))
        return bool(verdict["passed"])

    return broadcast_object(on_main_rank(dist, check), dist)


def train(cfg: DictConfig) -> tuple[dict[str, float], Path | None, bool | None]:
    """Validate, claim the run directory, build every group, fit and judge. Returns the last
    metrics, on rank 0 the run directory (None on other ranks), and the acceptance verdict (None
    when the report is off). A dry run stops after building and one batch: ``({}, None, None)``."""
    check_domains(HydraConfig.get().runtime.choices)  # before anything is built
    validate(cfg)
    if cfg.get("dry_run", False) and not _dry_run_ready:  # Hydra has created the run directory already
        raise ConfigError("dry_run", True, "true on the command line of a single run (python run.py ... dry_run=true),"
                                           " not in a config file or a -m sweep")
    # Built (and its values checked) on every rank before anything is written; cheap: it holds numbers.
    acceptance = build(cfg, "acceptance") if cfg.get("acceptance") is not None else None
    configure_host_allocator(cfg.host_allocator)
    dist = init_distributed(cfg.device)
    try:
        if cfg.get("dry_run", False):
            dry_run(cfg, dist, acceptance)
            return {}, None, None
        run_dir = Path(broadcast_object(HydraConfig.get().runtime.output_dir, dist))
        directory = on_main_rank(dist, lambda: claim_run_dir(cfg, run_dir))
        with directory if directory is not None else contextlib.nullcontext():
            metrics = fit(cfg, dist, run_dir)
            passed = judge(acceptance, dist, run_dir)  # still under the lock: it writes into the run dir
        return metrics, (run_dir if dist.is_main else None), passed
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # an error's frames would keep fit()'s DDP alive (see fit)
        raise
    finally:
        gc.collect()  # objects of fit() in reference cycles go too, while the group still exists
        shutdown(dist)


def say(line: str) -> None:
    """One line to stderr in one write: ``print`` writes the text and its newline separately, so the
    lines of two torchrun ranks could run into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics, run_dir, passed = train(cfg)
    except (ConfigError, DataFormatError, RunDirectoryError, StartupFailure) as exc:
        say(error_line(exc))
        sys.exit(2)
    warning = missing_best_warning(run_dir, cfg.trainer.best_metric) if run_dir is not None else None
    if warning:
        say(warning)
    if passed is False and cfg.acceptance.fail_exit:  # the same verdict on every rank: the same status
        sys.exit(FAILED_EXIT_CODE)
    value = metrics.get(cfg.trainer.best_metric) if cfg.trainer.best_metric else None
    return None if value is None else float(value)  # the objective of a sweep


if __name__ == "__main__":
    _hydra_writes_nothing()
    main()
