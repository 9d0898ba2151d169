"""Start-up checks of a composed config (run.py calls them before building the model or touching the run
directory): every key of every ``_target_`` node is a constructor argument, no value is NaN, the optimizer
accepts its values, the groups pick one domain, and the strategy fits the reward and the group size. Each
failure is a :class:`ConfigError` naming the full key."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from elign.engine.errors import ConfigError

__all__ = ["check_compatible", "check_domains", "check_finite_values", "check_keys", "check_optimizer"]

#: Hydra's instantiation keys: not constructor arguments.
_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
#: torch.optim's ValueError texts -> the optimizer argument they are about.
_OPTIMIZER_MESSAGES = (("learning rate", "lr"), ("epsilon", "eps"), ("beta", "betas"), ("weight_decay", "weight_decay"),
                       ("momentum", "momentum"), ("dampening", "dampening"))


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
