"""Model backends: the official ``Boltz2`` class, built at configured dimensions or loaded from a checkpoint.

``Boltz2`` (``boltz.model.models.boltz2``, a LightningModule) is used as a container of its public
sub-modules only; :class:`boltz_ft.core.Boltz2Core` re-composes the forward. Three upstream behaviours
are handled here (boltz.md §1.5):

- ``training_args`` / ``validation_args`` are read as attributes *and* with ``.get``: they are passed
  as OmegaConf ``DictConfig`` s.
- ``steering_args`` must hold ``fk_steering``, ``physical_guidance_update`` and
  ``contact_guidance_update`` (the sampler indexes them unconditionally): all three False here.
- ``Boltz2.load_from_checkpoint`` fails under Lightning >= 2.6 (``torch.load(weights_only=True)``
  refuses the pickled hyper-parameters of the official ``boltz2_conf.ckpt``). A Lightning checkpoint is
  a pickle, and unpickling runs code, so :func:`load_boltz2` unpickles only a file the user declared
  trusted (``trusted: true``, e.g. the official checkpoint from HF ``boltz-community/boltz-2``);
  any other file is read with ``weights_only=True`` and refused if that fails.

``use_kernels`` (cuequivariance triangle kernels) is refused off CUDA.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from elign.engine.errors import ConfigError

__all__ = ["STEERING_OFF", "boltz2_arguments", "build_boltz2", "load_boltz2"]

STEERING_OFF = {"fk_steering": False, "physical_guidance_update": False, "contact_guidance_update": False,
                "num_particles": 1, "fk_lambda": 1.0, "fk_resampling_interval": 1,
                "num_gd_steps": 0}
"""Inference-time steering off: GRPO and SFT train the weights, not the sampler's potentials."""

_DEFAULT_TRAINING_ARGS = {"recycling_steps": 0, "sampling_steps": 5, "diffusion_multiplicity": 1,
                          "diffusion_samples": 1, "confidence_loss_weight": 1e-4, "diffusion_loss_weight": 4.0,
                          "distogram_loss_weight": 3e-2, "symmetry_correction": False}
_DEFAULT_VALIDATION_ARGS = {"recycling_steps": 0, "sampling_steps": 5, "diffusion_samples": 1,
                            "symmetry_correction": False, "run_confidence_sequentially": False}


def _plain(value: Any) -> Any:
    """A Hydra node (or anything) as plain Python containers."""
    if isinstance(value, DictConfig) or OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return copy.deepcopy(value)


def boltz2_arguments(arguments: Mapping[str, Any], use_kernels: bool = False) -> dict[str, Any]:
    """``Boltz2`` constructor arguments with our fixed choices applied (see the module docstring)."""
    kwargs = {str(k): _plain(v) for k, v in dict(arguments).items()}
    training = {**_DEFAULT_TRAINING_ARGS, **(kwargs.pop("training_args", None) or {})}
    validation = {**_DEFAULT_VALIDATION_ARGS, **(kwargs.pop("validation_args", None) or {})}
    kwargs["training_args"] = OmegaConf.create(training)
    kwargs["validation_args"] = OmegaConf.create(validation)
    kwargs["steering_args"] = {**STEERING_OFF, **{k: False for k in ("fk_steering", "physical_guidance_update",
                                                                   "contact_guidance_update")}}
    kwargs["validate_structure"] = False
    kwargs["use_kernels"] = bool(use_kernels)
    kwargs.setdefault("diffusion_loss_args", {"add_smooth_lddt_loss": True, "nucleotide_loss_weight": 5.0,
                                              "ligand_loss_weight": 10.0})
    if kwargs.get("confidence_prediction", True):
        conf = kwargs.get("confidence_model_args")
        if not (isinstance(conf, dict) and "pairformer_args" in conf and "confidence_args" in conf):
            raise ConfigError("confidence_model_args", conf, "a mapping with pairformer_args and confidence_args "
                              "(boltz's ConfidenceModule reads both), or confidence_prediction: false")
    return kwargs


def _check_kernels(use_kernels: bool) -> None:
    if use_kernels and not torch.cuda.is_available():
        raise ConfigError("use_kernels", use_kernels, "false on a machine without CUDA (cuequivariance kernels)")


def build_boltz2(use_kernels: bool = False, seed: int | None = None, **arguments: Any) -> torch.nn.Module:
    """A randomly initialised official ``Boltz2`` with the given constructor arguments.

    Args:
        use_kernels: cuequivariance triangle kernels (CUDA only; LoRA on ``tri_mul_*`` stays effective
            because :mod:`boltz_ft.lora` parametrises ``.weight`` itself).
        seed: seed of the random initialisation (None = the current RNG state).
        **arguments: ``Boltz2``'s own arguments (``token_s``, ``pairformer_args``, ...).
    """
    from boltz.model.models.boltz2 import Boltz2

    _check_kernels(use_kernels)
    kwargs = boltz2_arguments(arguments, use_kernels)
    # boltz's lecun_normal_init_ draws from scipy's truncnorm, i.e. NumPy's global state: seed both.
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
        try:
            model = Boltz2(**kwargs)
        finally:
            if seed is not None:
                np.random.set_state(numpy_state)
    model.validate_structure = False  # upstream issue #565: never assigned in boltz 2.2.x
    return model


def _read_checkpoint(path: Path, trusted: bool) -> dict[str, Any]:
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)  # noqa: S614 - the user vouched for it
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal of the safe loader means the same here
        raise ConfigError("model.backend.trusted", False,
                          f"true to unpickle {path} (a Lightning checkpoint with pickled hyper-parameters: "
                          f"weights_only loading refused it: {str(exc).splitlines()[0][:160]}); "
                          "only do so for a file you trust, such as the official boltz2_conf.ckpt") from None


def load_boltz2(checkpoint: str | Path, trusted: bool = False, use_kernels: bool = False,
                overrides: Mapping[str, Any] | None = None, strict: bool = True) -> torch.nn.Module:
    """The official ``Boltz2`` from a Lightning checkpoint (``boltz2_conf.ckpt``), on CPU.

    Args:
        checkpoint: local path of the checkpoint.
        trusted: unpickle the file (needed for the official checkpoint; see the module docstring).
        use_kernels: as :func:`build_boltz2`.
        overrides: constructor arguments that replace the stored hyper-parameters (``boltz predict``
            overrides ``pairformer_args``, ``msa_args``, ``diffusion_process_args``, ...).
        strict: every weight of the checkpoint must match the built model.
    Raises:
        FileNotFoundError: no file at ``checkpoint``.
        ConfigError: an untrusted pickle, or a checkpoint without ``state_dict`` / ``hyper_parameters``.
    """
    from boltz.model.models.boltz2 import Boltz2

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.backend.checkpoint: no Boltz-2 checkpoint at {path}")
    _check_kernels(use_kernels)
    state = _read_checkpoint(path, trusted)
    if not isinstance(state, dict) or "state_dict" not in state or "hyper_parameters" not in state:
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ConfigError("model.backend.checkpoint", str(path),
                          f"a Lightning checkpoint with state_dict and hyper_parameters (found {keys})")
    hparams = {k: v for k, v in dict(state["hyper_parameters"]).items() if not k.startswith("_")}
    hparams.update({str(k): _plain(v) for k, v in dict(overrides or {}).items()})
    hparams.pop("ema", None)
    kwargs = boltz2_arguments(hparams, use_kernels)
    model = Boltz2(**kwargs, ema=False)
    weights = state["state_dict"]
    model.load_state_dict(weights, strict=strict)
    model.validate_structure = False
    return model
