"""Entry point: the only place that sees the whole config.

    python run.py                                          # default job
    python run.py strategy=fed_grpo reward=dummy           # pick options per group
    python run.py -m reward=dummy strategy.clip_range=1e-3,2e-3   # Hydra multirun sweep
    torchrun --standalone --nproc_per_node=2 run.py ...    # data-parallel (gloo on CPU)
    python run.py --cfg job                                # print the composed config

Each config group is instantiated through its ``_target_`` and the objects are handed to the
trainer. A bad value stops start-up with a message naming the full key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from elign.engine.distributed import broadcast_object, init_distributed, shutdown
from elign.engine.errors import ConfigError
from elign.engine.memory import configure_host_allocator

GROUPS = ("dataloader", "strategy", "model", "reward", "filter", "logger")


def _non_main_ranks_write_nothing() -> None:
    """Under torchrun every rank runs Hydra; only rank 0 may create a run directory, so the other
    ranks get a run dir of '.', no .hydra/ folder and no log file (rank 0's dir is broadcast)."""
    if int(os.environ.get("RANK", "0")) == 0:
        return
    argv = [a for a in sys.argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    sys.argv = argv + ["hydra.run.dir=.", "hydra.output_subdir=null",
                       "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


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

    walk(node, prefix)
    exact = [p for p, v in found if v == value]
    return (exact or [p for p, _ in found] or [f"{prefix}.{key}"])[0]


def build(cfg: DictConfig, group: str, **kwargs: Any) -> Any:
    """Instantiate one config group; a ConfigError comes back with its full key (``model.num_steps``).

    ``kwargs`` are live objects (policy, DistInfo, ...): they are passed to the constructor
    directly, never through Hydra, which would try to convert them into config nodes."""
    try:
        if kwargs:
            return instantiate(cfg[group], _partial_=True)(**kwargs)
        return instantiate(cfg[group])
    except (InstantiationException, ConfigError) as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise ConfigError(_key_path(cfg[group], cause.key, cause.value, group), cause.value, cause.allowed) from None


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


def train(cfg: DictConfig) -> dict[str, float]:
    check_domains(HydraConfig.get().runtime.choices)  # before anything is built
    configure_host_allocator(cfg.host_allocator)
    dist = init_distributed(cfg.device)
    run_dir = Path(broadcast_object(HydraConfig.get().runtime.output_dir, dist))
    torch.manual_seed(cfg.seed)  # model initialisation; iterations reseed themselves
    dataloader = build(cfg, "dataloader")
    strategy = build(cfg, "strategy")
    check_compatible(cfg, dataloader, strategy)
    policy = build(cfg, "model").to(dist.device)
    # Supervised recipes need no reward or filter (null groups); RL strategies refuse to start without a reward.
    objects = {g: build(cfg, g) if cfg.get(g) is not None else None for g in ("reward", "filter", "logger")}
    objects["evaluator"] = build(cfg, "evaluator") if cfg.get("evaluator") is not None else None
    trainer = build(cfg, "trainer", policy=policy, strategy=strategy, dataloader=dataloader, run_dir=str(run_dir),
                    dist=dist, **objects)
    # Set after instantiation: passed through instantiate(), Hydra would try to build its _target_s.
    trainer.run_config = OmegaConf.to_container(cfg, resolve=True)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    try:
        return trainer.fit()
    finally:
        shutdown(dist)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except ConfigError as exc:
        print(f"Config error: {exc}", file=sys.stderr)
        sys.exit(2)
    if cfg.trainer.best_metric and not Path(HydraConfig.get().runtime.output_dir, "checkpoint_best.pth").exists():
        print(f"warning: trainer.best_metric={cfg.trainer.best_metric!r} was never logged; no best checkpoint",
              file=sys.stderr)
    value = metrics.get(cfg.trainer.best_metric) if cfg.trainer.best_metric else None
    return None if value is None else float(value)  # the objective of a sweep


if __name__ == "__main__":
    _non_main_ranks_write_nothing()
    main()
