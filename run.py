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
import importlib
import inspect
import math
import os
import re
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from elign.engine.acceptance import FAILED_EXIT_CODE, AcceptanceReport, summary_line
from elign.engine.checkpoint import check_resume, missing_best_warning
from elign.engine.distributed import DistInfo, broadcast_object, check_device, init_distributed, shutdown
from elign.engine.errors import ConfigError, DataFormatError, RunDirectoryError, check_int
from elign.engine.memory import configure_host_allocator
from elign.engine.rundir import CONFIG_FILE, RunDirectory

GROUPS = ("dataloader", "strategy", "model", "reward", "filter", "logger", "acceptance")
#: Constructor arguments that run.py passes as live objects, not from the config.
LIVE_ARGUMENTS = {"trainer": ("policy", "strategy", "dataloader", "run_dir", "dist", "reward", "filter", "logger",
                              "evaluator", "run_config")}
#: Hydra's instantiation keys: not constructor arguments.
_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
#: torch.optim's ValueError texts -> the optimizer argument they are about.
_OPTIMIZER_MESSAGES = (("learning rate", "lr"), ("epsilon", "eps"), ("beta", "betas"), ("weight_decay", "weight_decay"),
                       ("momentum", "momentum"), ("dampening", "dampening"))


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


def check_compatible(cfg: DictConfig, dataloader: Any, strategy: Any) -> None:
    """Checks that span two groups."""
    if getattr(strategy, "kind", "rl") == "rl" and cfg.get("reward") is None:
        raise ConfigError("reward", None, f"a reward option: {cfg.strategy._target_.rsplit('.', 1)[-1]} is an RL strategy")
    need = getattr(strategy, "min_group_size", 1)
    if dataloader.group_size < need:
        raise ConfigError("dataloader.group_size", dataloader.group_size,
                          f"an integer >= {need} for strategy {cfg.strategy._target_.rsplit('.', 1)[-1]}")


def check_domains(choices: Mapping[str, str | None]) -> None:
    """Refuse a composition whose config groups pick options of two domains.

    ``choices`` are Hydra's runtime choices (``{"model": "edm/base", "reward": "dummy", ...}``). An
    option's domain is its folder (``edm/base`` -> ``edm``); an option without one (``dummy``,
    ``fed_grpo``) is domain-neutral, and Hydra's own groups (``hydra/...``) are ignored. The domain
    of the experiment, if it has one, is the reference; otherwise the domain most groups pick.
    """
    domains = {group: choice.split("/", 1)[0] for group, choice in sorted(choices.items())
               if choice is not None and "/" in choice and group != "hydra" and not group.startswith("hydra/")}
    if len(set(domains.values())) < 2:
        return
    picks = list(domains.values())
    reference = domains.get("experiment") or max(sorted(set(picks)), key=picks.count)
    picked_by = next(g for g in ("experiment", *domains) if domains.get(g) == reference)
    group = next(g for g, d in domains.items() if d != reference)
    raise ConfigError(group, choices[group],
                      f"an option of domain '{reference}' (the domain of {picked_by}={choices[picked_by]}) or a "
                      f"domain-neutral one; {group} picks domain '{domains[group]}', and one run cannot mix domains")


def check_finite_values(cfg: DictConfig) -> None:
    """No NaN or ±inf anywhere in the config: no key of this framework gives them a meaning (a key
    that can be switched off says so with null), and a NaN slips through every ``x < low`` check."""

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, value, "a finite number (null where the key allows switching it off)")

    walk(OmegaConf.to_container(cfg, resolve=True), "")


def _locate(target: str) -> Any:
    """The object a dotted ``_target_`` names (what Hydra imports, without its error logging)."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name is None or not ".".join(parts[:cut]).startswith(exc.name):
                raise  # the module exists but fails to import one of its own dependencies
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(f"no module named {parts[0]!r}")


def _signature(target: str, key: str) -> inspect.Signature | None:
    try:
        obj = _locate(target)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(key, target, f"an importable class or function ({type(exc).__name__}: {exc})") from None
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return None


def check_keys(node: Any, prefix: str, live: tuple[str, ...] = ()) -> None:
    """Every key of every ``_target_`` node under ``node`` is an argument of its constructor, and no
    required argument is missing (``live`` ones are passed by run.py): an unknown key such as
    ``+trainer.lerning_rate=1`` stops start-up naming that key, not with a TypeError from Hydra."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_keys(item, f"{prefix}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node:
        signature = _signature(node._target_, f"{prefix}._target_")
        if signature is not None:
            params = signature.parameters
            keywords = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            configurable = [n for n in keywords if n not in live]
            if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
                for key in node.keys():
                    if str(key) not in _HYDRA_KEYS and str(key) not in params:
                        raise ConfigError(f"{prefix}.{key}", node._get_node(key)._value(),
                                          f"a key of {node._target_}: {', '.join(configurable)}")
            if not node.get("_partial_", False):
                present = {str(k) for k in node.keys()}  # includes keys left ??? (reported below)
                for name in keywords:
                    p = params[name]
                    if p.default is p.empty and name not in present and name not in live:
                        raise ConfigError(f"{prefix}.{name}", "<missing>", f"a value: {node._target_} needs it")
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{prefix}.{key}", "???", "a value (the config leaves this key for you to set)")
        check_keys(node._get_node(key), f"{prefix}.{key}")


def check_optimizer(cfg: DictConfig) -> None:
    """Build the optimizer on a dummy parameter, so that ``trainer.optimizer.lr=-1`` stops start-up
    naming the key instead of failing inside the trainer after the model was built."""
    try:
        instantiate(cfg.trainer.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        name = next((arg for text, arg in _OPTIMIZER_MESSAGES if text in message.lower()), None)
        if name is None or name not in cfg.trainer.optimizer:
            raise ConfigError("trainer.optimizer", cfg.trainer.optimizer._target_, message) from None
        value = OmegaConf.to_container(cfg.trainer.optimizer, resolve=True)[name]
        raise ConfigError(f"trainer.optimizer.{name}", value, f"a value torch accepts ({message})") from None


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
