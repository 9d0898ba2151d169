"""Import an upstream EDM checkpoint folder (``ehoogeboom/e3_diffusion_for_molecules``, and ELIGN's copy).

A folder holds ``args.pickle`` (a pickled ``argparse.Namespace``) and ``generative_model_ema.npy`` /
``generative_model.npy`` (despite the name: ``torch.save`` of the ``EnVariationalDiffusion`` state dict).
Layout and field table: ``shared/specs/edm_checkpoint_format.md`` §1-§3, §7.

``args.pickle`` is read by an unpickler that resolves only ``argparse.Namespace``: a pickle can call any
importable callable while loading, and this file comes from the internet. The weights go through
``torch.load(weights_only=True)`` for the same reason.

CLI: ``python -m elign.edm.upstream FOLDER OUT.pth [--args ARGS]`` writes a plain dynamics state dict
(keys ``egnn.*``) that ``EDMPolicy(checkpoint=OUT.pth)`` loads, and prints the matching model config.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from elign.edm.egnn import EGNNDynamics
from elign.edm.schedule import PolynomialSchedule
from elign.engine.errors import ConfigError, DataFormatError

ARGS_FILE = "args.pickle"
EMA_FILE = "generative_model_ema.npy"
RAW_FILE = "generative_model.npy"
NUM_ATOM_TYPES = 5  # QM9 with hydrogens: H, C, N, O, F
COORDS_RANGE = 15.0  # upstream egnn_dynamics default; not stored in args.pickle
GAMMA_TOLERANCE = 1e-4
SUPPORTED_NORMALIZE_FACTORS = (1.0, 4.0, 10.0)  # x, one-hot, charges: what EDMPolicy hard-codes
_POLYNOMIAL = re.compile(r"polynomial_(\d+(?:\.\d+)?)$")


class ForbiddenGlobalError(DataFormatError):
    """``args.pickle`` references a global other than ``argparse.Namespace``; nothing was called."""

    def __init__(self, path: str, global_name: str) -> None:
        super().__init__(path, None, f"refused to load global {global_name!r}: only argparse.Namespace is "
                         "allowed in an EDM args.pickle (the file may be corrupt or malicious)")
        self.global_name = global_name


class _NamespaceUnpickler(pickle.Unpickler):
    """Unpickler whose only resolvable global is ``argparse.Namespace``.

    Every opcode that imports (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) goes through ``find_class``, so
    refusing there means no other callable ever reaches REDUCE/NEWOBJ.
    """

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        raise ForbiddenGlobalError(self._path, f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise DataFormatError(self._path, None, "persistent references are not allowed in args.pickle")


def read_args(path: str | os.PathLike[str]) -> argparse.Namespace:
    """Read ``args.pickle`` with the restricted unpickler.

    Raises:
        ForbiddenGlobalError: the pickle names any global but ``argparse.Namespace``.
        DataFormatError: not a pickle, or not a Namespace.
    """
    where = str(path)
    with open(path, "rb") as handle:
        try:
            obj = _NamespaceUnpickler(handle, where).load()
        except DataFormatError:
            raise
        except Exception as err:  # the pickle machinery raises many types on malformed input
            raise DataFormatError(where, None, f"not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, argparse.Namespace):
        raise DataFormatError(where, None, f"expected an argparse.Namespace, got {type(obj).__name__}")
    return obj


def _field(args: argparse.Namespace, path: str, key: str, kind: type | tuple[type, ...]) -> Any:
    if not hasattr(args, key):
        raise DataFormatError(path, None, f"field {key!r} is missing (upstream argparse defaults differ from the "
                              "QM9 run, so none is assumed)")
    value = getattr(args, key)
    # bool is an int subclass: True must not pass as nf = 1.
    if not isinstance(value, kind) or (kind in (int, float, (int, float)) and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{path}:{key}", value, f"a value of type {names}")
    return value


def model_config(args: argparse.Namespace, path: str = ARGS_FILE) -> dict[str, Any]:
    """Validate the fields we support and return ``{"dynamics": EGNNDynamics kwargs, "schedule":
    PolynomialSchedule kwargs, "norm_values": [x, h_cat, h_int]}``.

    Raises ConfigError (key ``<file>:<field>``) for an unsupported value, DataFormatError for a
    missing field.
    """

    def bad(key: str, allowed: str) -> ConfigError:
        return ConfigError(f"{path}:{key}", getattr(args, key, None), allowed)

    if _field(args, path, "model", str) != "egnn_dynamics":
        raise bad("model", "egnn_dynamics (gnn_dynamics has other parameter names)")
    if _field(args, path, "probabilistic_model", str) != "diffusion":
        raise bad("probabilistic_model", "diffusion")
    schedule = _field(args, path, "diffusion_noise_schedule", str)
    match = _POLYNOMIAL.match(schedule)
    if schedule == "learned":
        raise bad("diffusion_noise_schedule", "polynomial_<p>; a 'learned' schedule's gamma is a trained "
                  "network (gamma.l1/l2/l3 weights) that this importer does not rebuild")
    if match is None:
        raise bad("diffusion_noise_schedule", "polynomial_<p> (e.g. polynomial_2); cosine and learned "
                  "schedules are not implemented")
    if _field(args, path, "sin_embedding", bool):
        raise bad("sin_embedding", "False (the sinusoidal distance embedding changes the edge width)")
    if getattr(args, "aggregation_method", "sum") != "sum":
        raise bad("aggregation_method", "sum or absent")
    conditioning = getattr(args, "conditioning", [])
    if conditioning not in ([], None) or getattr(args, "context_node_nf", 0) != 0:
        key = "conditioning" if conditioning not in ([], None) else "context_node_nf"
        raise bad(key, "an unconditional model (conditioning [] and context_node_nf 0)")
    if getattr(args, "dataset", "qm9") not in ("qm9", "qm9_second_half"):
        raise bad("dataset", "qm9 or qm9_second_half (5 atom types H, C, N, O, F)")
    if getattr(args, "remove_h", False):
        raise bad("remove_h", "False (without hydrogens there are 4 atom types)")
    factors = _field(args, path, "normalize_factors", (list, tuple))
    if len(factors) != 3 or [float(f) for f in factors] != list(SUPPORTED_NORMALIZE_FACTORS):
        raise bad("normalize_factors", "[1, 4, 10] (the scaling EDMPolicy uses)")
    include_charges = _field(args, path, "include_charges", bool)
    steps = _field(args, path, "diffusion_steps", int)
    precision = _field(args, path, "diffusion_noise_precision", (int, float))
    dynamics = {
        "in_node_nf": NUM_ATOM_TYPES + int(include_charges),
        "hidden_nf": _field(args, path, "nf", int),
        "num_layers": _field(args, path, "n_layers", int),
        "inv_sublayers": _field(args, path, "inv_sublayers", int),
        "attention": _field(args, path, "attention", bool),
        "tanh": _field(args, path, "tanh", bool),
        "coords_range": COORDS_RANGE,
        "norm_constant": float(_field(args, path, "norm_constant", (int, float))),
        "normalization_factor": float(_field(args, path, "normalization_factor", (int, float))),
        "condition_time": _field(args, path, "condition_time", bool),
    }
    return {
        "dynamics": dynamics,
        "schedule": {"steps": steps, "power": float(match.group(1)), "precision": float(precision)},
        "norm_values": [float(f) for f in factors],
    }


def _resolve(folder_or_file: str | os.PathLike[str], args_path: str | os.PathLike[str] | None
             ) -> tuple[Path, Path | None]:
    """``(args.pickle, explicit weights file or None when a folder was given)``."""
    src = Path(folder_or_file)
    if src.is_dir():
        return (Path(args_path) if args_path is not None else src / ARGS_FILE), None
    if not src.exists():
        raise FileNotFoundError(f"EDM checkpoint not found: {src}")
    return (Path(args_path) if args_path is not None else src.parent / ARGS_FILE), src


def _flow_state(obj: Any, path: str) -> dict[str, Tensor]:
    """The flow's (``EnVariationalDiffusion``) state dict, by the recipe of spec §7: unwrap
    ``model_state_dict``, strip ``module.``, keep the ``model.`` copy of ELIGN's doubled dict."""
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                      for k, v in obj.items()):
        raise DataFormatError(path, None, "expected a state dict (str -> Tensor)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("model.dynamics.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return state


def _short(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_state(state: dict[str, Tensor], dynamics: EGNNDynamics, steps: int, path: str, hint: str) -> None:
    """Strict key and shape check against the model built from ``args.pickle``."""
    expected: dict[str, tuple[int, ...]] = {"buffer": (1,), "gamma.gamma": (steps + 1,)}
    expected.update({f"dynamics.{k}": tuple(v.shape) for k, v in dynamics.state_dict().items()})
    if any(k.startswith("gamma.") and k != "gamma.gamma" for k in state):
        raise DataFormatError(path, None, "the weights hold a learned noise schedule (gamma.l1/l2/l3 ...); "
                              "only fixed polynomial schedules are supported")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {shape}" for k, shape in expected.items()
             if k in state and tuple(state[k].shape) != shape]
    if wrong:
        problems.append(f"shape mismatches: {_short(wrong, 3)}")
    if problems:
        raise DataFormatError(path, None, f"weights do not match the model described by args.pickle ({hint}); "
                              + "; ".join(problems))


def load_upstream_edm(
    folder_or_file: str | os.PathLike[str], args_path: str | os.PathLike[str] | None = None
) -> tuple[EGNNDynamics, PolynomialSchedule, dict[str, Any]]:
    """Build our ``EGNNDynamics`` and ``PolynomialSchedule`` from an upstream checkpoint.

    Args:
        folder_or_file: a checkpoint folder (weights chosen as upstream's eval scripts do:
            ``generative_model_ema.npy`` if ``args.ema_decay > 0``, else ``generative_model.npy``), or an
            explicit weights file (also ELIGN's 282-key dicts and trainer checkpoints, spec §7).
        args_path: ``args.pickle`` (default: in the folder, or next to the weights file).
    Returns:
        ``(dynamics, schedule, info)``; ``info`` holds the paths, whether the EMA file was used, the
        validated config (``model_config``), all pickle fields (``args``), ``gamma_max_abs_diff``
        (between the file's table and ours) and ``num_parameters``.
    """
    args_file, weights = _resolve(folder_or_file, args_path)
    args = read_args(args_file)
    config = model_config(args, str(args_file))
    ema = None
    if weights is None:
        ema_decay = _field(args, str(args_file), "ema_decay", (int, float))
        ema = float(ema_decay) > 0
        weights = Path(folder_or_file) / (EMA_FILE if ema else RAW_FILE)
        if not weights.exists():
            others = sorted(p.name for p in Path(folder_or_file).glob("*.npy"))
            raise FileNotFoundError(f"{weights} not found (chosen because ema_decay={ema_decay}); "
                                    f"weight files present: {others or 'none'}")
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refusals are UnpicklingError; corrupt files raise others
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataFormatError(str(weights), None, f"torch.load(weights_only=True) failed: {first}") from None
    state = _flow_state(obj, str(weights))

    dynamics = EGNNDynamics(**config["dynamics"])
    schedule = PolynomialSchedule(**config["schedule"])
    dyn_cfg = config["dynamics"]
    hint = (f"nf={dyn_cfg['hidden_nf']}, n_layers={dyn_cfg['num_layers']}, inv_sublayers={dyn_cfg['inv_sublayers']}, "
            f"in_node_nf={dyn_cfg['in_node_nf']}, diffusion_steps={schedule.steps}")
    _check_state(state, dynamics, schedule.steps, str(weights), hint)

    gamma = state["gamma.gamma"].detach().double()
    ours = schedule.table.double()
    diff = (gamma - ours).abs()
    worst = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    max_diff = float(diff[worst]) if torch.isfinite(gamma).all() else float("inf")
    if not max_diff <= GAMMA_TOLERANCE:
        s = config["schedule"]
        raise DataFormatError(
            str(weights), None, f"gamma.gamma does not match the polynomial_{s['power']:g} table (steps "
            f"{s['steps']}, precision {s['precision']:g}) recomputed from {args_file.name}: max |diff| "
            f"{max_diff:.3g} > {GAMMA_TOLERANCE:g} at step {worst} (file {float(gamma[worst]):.6f}, "
            f"ours {float(ours[worst]):.6f})"
        )
    # buffer (zeros(1)) and gamma.gamma are flow state, not parameters of the dynamics.
    dynamics.load_state_dict(
        OrderedDict((k.removeprefix("dynamics."), v) for k, v in state.items() if k.startswith("dynamics.")),
        strict=True,
    )
    info = {
        "args_path": str(args_file),
        "weights_path": str(weights),
        "ema": ema,
        "config": config,
        "args": dict(vars(args)),
        "gamma_max_abs_diff": max_diff,
        "num_parameters": sum(p.numel() for p in dynamics.parameters()),
    }
    return dynamics, schedule, info


def save_as_dynamics_state(
    folder_or_file: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    args_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Convert an upstream checkpoint to a plain dynamics state dict (keys ``egnn.*``) at ``out_path``,
    loadable by ``EDMPolicy(checkpoint=out_path)``. Returns ``load_upstream_edm``'s info."""
    dynamics, _, info = load_upstream_edm(folder_or_file, args_path)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dynamics.state_dict(), out)
    info["out_path"] = str(out)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the model/schedule config that matches the converted weights."""
    parser = argparse.ArgumentParser(prog="python -m elign.edm.upstream", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="upstream checkpoint folder, or a weights file")
    parser.add_argument("out", help="output .pth (plain dynamics state dict)")
    parser.add_argument("--args", default=None, help="args.pickle (default: in the folder / next to the file)")
    ns = parser.parse_args(argv)
    try:
        info = save_as_dynamics_state(ns.checkpoint, ns.out, ns.args)
    except (DataFormatError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {k: info[k] for k in ("weights_path", "out_path", "num_parameters", "gamma_max_abs_diff")}
    summary.update(model=info["config"]["dynamics"], schedule=info["config"]["schedule"])
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
