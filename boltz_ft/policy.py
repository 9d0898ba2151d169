"""``BoltzPolicy``: the official Boltz-2 as the engine's policy (SFT now; the GRPO sampler policy builds on it).

What the engine sees: ``module`` (the :class:`boltz_ft.sft.Boltz2SFT` that DDP wraps), ``supervised_loss``,
the trainable parameters (LoRA adapters, or every weight without LoRA), and a checkpoint entry that
holds only the adapters of a LoRA run. Batches follow the schema ``{"inputs", "targets", "meta"}``;
inputs and targets are merged into a fresh dict per call because the model reads both from one dict.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from elign.engine.checkpoint import atomic_save, load_checkpoint
from elign.engine.errors import ConfigError, check_int
from boltz_ft import lora as lora_lib
from boltz_ft.sft import Boltz2SFT

__all__ = ["BoltzPolicy", "merge_features"]

LORA_KEYS = ("target_modules", "r", "alpha", "dropout")


def merge_features(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Tensor]:
    """One fresh feature dict of the batch's ``inputs`` and ``targets`` on ``device`` (boltz mutates it)."""
    feats = {k: v.to(device) for k, v in batch["inputs"].items()}
    feats.update({k: v.to(device) for k, v in batch["targets"].items()})
    return feats


#: Entry of a LoRA run's ``model`` state: per base weight (sum, sum of squares), the base the adapters were trained
#: on. Adapters are only meaningful on that base; a run built from another seed, size or checkpoint is refused.
FINGERPRINT_KEY = "base_fingerprint"


def base_fingerprint(model: nn.Module) -> Tensor:
    """``[P, 2]`` float64: (sum, sum of squares) of each of ``model``'s parameters (before adapters)."""
    with torch.no_grad():
        return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in model.parameters()])


def check_fingerprint(saved: Tensor, expected: Tensor, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` when ``saved`` is not the fingerprint of this base model."""
    if saved.shape != expected.shape or not torch.allclose(saved.double(), expected, rtol=1e-9, atol=1e-9):
        raise ValueError(f"{what}: its adapters were trained on another base model than this run's model.backend "
                         "(another seed, size or checkpoint); build the same backend (e.g. seed=<that run's seed>)")


def merge_run_adapters(model: nn.Module, run_dir: str | Path) -> None:
    """Merge the adapters of a LoRA run (its ``config.yaml`` ``model.lora`` and best, else latest,
    checkpoint) into ``model``'s base weights, in place; every weight is trainable again afterwards.
    The run's base fingerprint must match ``model`` (checkpoints written before it existed are taken as they are)."""
    from elign.engine.checkpoint import BEST, LATEST

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError("model.base_run", str(run_dir), "a run directory with config.yaml (a LoRA run)")
    lora = OmegaConf.load(config).model.get("lora")
    if lora is None:
        raise ConfigError("model.base_run", str(run_dir), "a LoRA run (its config has model.lora)")
    path = next((run_dir / name for name in (BEST, LATEST) if (run_dir / name).is_file()), None)
    if path is None:
        raise ConfigError("model.base_run", str(run_dir), f"a run directory holding {BEST} or {LATEST}")
    state = dict(load_checkpoint(path)["model"])
    saved = state.pop(FINGERPRINT_KEY, None)
    if saved is not None:
        try:
            check_fingerprint(saved, base_fingerprint(model), str(path))
        except ValueError as exc:
            raise ConfigError("model.base_run", str(run_dir), f"a run on this base model ({exc})") from None
    holder = Boltz2SFT(model)  # the run's adapter names carry the SFT module's "model." prefix
    lora_lib.apply_lora(model, list(lora.target_modules), r=int(lora.r), alpha=float(lora.alpha),
                        dropout=float(lora.get("dropout", 0.0)))
    lora_lib.load_lora_state_dict(holder, state)
    lora_lib.merge_lora(model)
    model.requires_grad_(True)


class BoltzPolicy:
    """Boltz-2 with optional LoRA adapters, trained through the engine.

    Args:
        backend: the official ``Boltz2`` (``boltz_ft.backend.build_boltz2`` / ``load_boltz2``) or the
            fallback module.
        sft: arguments of :class:`boltz_ft.sft.Boltz2SFT` (multiplicity, loss weights, confidence term).
        lora: ``{target_modules, r, alpha, dropout}`` to train adapters only; None trains every weight.
        recycling_steps: most recycling passes per SFT step; each step draws 0..recycling_steps, as
            boltz's training does.
        checkpoint: a run checkpoint (``model`` entry) or an adapters file to start from; None = as built.
        seed: seed of the adapters' initialisation.
        base_run: a LoRA run directory (e.g. an SFT run) whose adapters are merged into the base weights first;
            this run's adapters then train on top, and the KL reference (scale 0) is that merged model.
    """

    def __init__(self, backend: nn.Module, sft: Mapping[str, Any] | None = None, lora: Mapping[str, Any] | None = None,
                 recycling_steps: int = 0, checkpoint: str | None = None, seed: int = 0,
                 base_run: str | None = None) -> None:
        self.recycling_steps = check_int("recycling_steps", recycling_steps, 0)
        sft = OmegaConf.to_container(sft, resolve=True) if isinstance(sft, DictConfig) else dict(sft or {})
        if base_run is not None:
            merge_run_adapters(backend, base_run)
        self.base_fingerprint = base_fingerprint(backend) if lora is not None else None
        self.module = Boltz2SFT(backend, **sft)
        self.lora = None if lora is None else (OmegaConf.to_container(lora, resolve=True)
                                               if isinstance(lora, DictConfig) else dict(lora))
        if self.lora is not None:
            unknown = sorted(set(self.lora) - set(LORA_KEYS))
            if unknown:
                raise ConfigError("model.lora", unknown, f"keys among {LORA_KEYS}")
            self.adapted = lora_lib.apply_lora(self.model, list(self.lora["target_modules"]), r=int(self.lora["r"]),
                                               alpha=float(self.lora["alpha"]),
                                               dropout=float(self.lora.get("dropout", 0.0)), seed=seed)
        self._forward: Callable[..., dict[str, Tensor]] = self.module
        if checkpoint is not None:
            try:
                self.load_state_dict(self._read_checkpoint(checkpoint))
            except ValueError as exc:
                raise ConfigError("model.checkpoint", checkpoint, f"adapters of this base model ({exc})") from None

    # ------------------------------------------------------------------ engine contract

    @property
    def model(self) -> nn.Module:
        """The official ``Boltz2`` (or fallback) inside the SFT module."""
        return self.module.model

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device: torch.device | str) -> "BoltzPolicy":
        self.module.to(device)
        return self

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route the differentiable SFT forward through ``wrap(module)`` (DDP)."""
        self._forward = wrap(self.module)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        if self.lora is not None:
            return lora_lib.lora_parameters(self.module)
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def supervised_loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Boltz-2's structure-training loss on one batch (mean over its targets and noise levels)."""
        feats = merge_features(batch, self.device)
        recycling = random.randint(0, self.recycling_steps)  # the trainer reseeds every iteration
        out = self._forward(feats, recycling)
        metrics = {f"loss_{k}": float(v) for k, v in out.items() if k != "loss"}
        metrics.update({"num_samples": float(feats["coords"].shape[0]), "recycling_steps": float(recycling)})
        return out["loss"], metrics

    def state_dict(self) -> dict[str, Tensor]:
        """The checkpoint's ``model`` entry: the adapters of a LoRA run and its base fingerprint, else every weight."""
        if self.lora is None:
            return self.module.state_dict()
        return {**lora_lib.lora_state_dict(self.module), FINGERPRINT_KEY: self.base_fingerprint}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Adapters (checked against this base's fingerprint when the state has one), else every weight."""
        if self.lora is not None:
            state = dict(state)
            saved = state.pop(FINGERPRINT_KEY, None)
            if saved is not None:
                check_fingerprint(saved, self.base_fingerprint, "the checkpoint")
            lora_lib.load_lora_state_dict(self.module, state)
        else:
            self.module.load_state_dict(dict(state))

    # ------------------------------------------------------------------ inference and export

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode (no dropout) and no gradients; restores the training flag."""
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.module.train(was_training)

    def predict(self, batch: Mapping[str, Any], diffusion_samples: int, sampling_steps: int,
                recycling_steps: int = 0, confidence: bool = False) -> dict[str, Tensor]:
        """Sample structures for a batch of one target.

        Returns:
            ``coords`` ``[S, M, 3]``, ``pdistogram`` ``[1, N, N, 1, bins]`` and, with ``confidence``, the
            confidence head's ``plddt`` ``[S, N]``, ``ptm`` ``[S]``, ...
        """
        core = self.module.core
        feats = merge_features(batch, self.device)
        with self.evaluating():
            trunk = core.trunk(feats, recycling_steps, grad=False)
            coords = core.sample(trunk, feats, sampling_steps, diffusion_samples)
            out = {"coords": coords, "pdistogram": trunk.pdistogram}
            if confidence:
                out.update(core.confidence(trunk, feats, coords, diffusion_samples))
        return out

    def describe(self, batch: Mapping[str, Any], diffusion_samples: int = 2,
                 sampling_steps: int = 2) -> dict[str, tuple[int, ...] | float | int | str]:
        """What ``run.py ... dry_run=true`` prints for one batch: the shapes of its ``inputs/<key>`` and
        ``targets/<key>``, of one no-grad forward's trunk outputs (``outputs/s``, ``outputs/z``,
        ``outputs/pdistogram``) and of a sample (``outputs/sample_atom_coords``: ``diffusion_samples``
        structures, ``sampling_steps`` steps, through :meth:`predict`), the SFT loss terms at recycling 0
        (``losses/<name>``, floats) and the parameter counts. Runs on this process only (the unwrapped
        module, no collective); restores the training flag."""
        out: dict[str, tuple[int, ...] | float | int | str] = {}
        for part in ("inputs", "targets"):
            out.update({f"{part}/{k}": tuple(v.shape) for k, v in batch[part].items()})
        feats = merge_features(batch, self.device)
        with self.evaluating():
            trunk = self.module.core.trunk(feats, 0, grad=False)
            out.update({"outputs/s": tuple(trunk.s.shape), "outputs/z": tuple(trunk.z.shape),
                        "outputs/pdistogram": tuple(trunk.pdistogram.shape)})
            sample = self.predict(batch, diffusion_samples, sampling_steps)
            out["outputs/sample_atom_coords"] = tuple(sample["coords"].shape)
        with torch.no_grad():  # in the module's own mode, as a training step computes them
            losses = self.module(merge_features(batch, self.device), 0)
        out.update({f"losses/{k}": float(v) for k, v in losses.items()})
        trainable = sum(p.numel() for _, p in self.trainable_parameters())
        total = sum(p.numel() for p in self.module.parameters())
        out.update({"parameters/trainable": trainable, "parameters/total": total,
                    "model/backend": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                    "model/lora": "off (every weight trains)" if self.lora is None else
                    f"r={self.lora['r']} alpha={self.lora['alpha']} on {len(self.adapted)} modules"})
        return out

    def export(self, path: str | Path) -> Path:
        """A Lightning-layout checkpoint (``state_dict`` + ``hyper_parameters``) with the adapters merged
        into the base weights, readable by :func:`boltz_ft.backend.load_boltz2` without unpickling code."""
        import copy

        model = copy.deepcopy(self.model).cpu()
        if self.lora is not None:
            lora_lib.merge_lora(model)
        hparams = {k: (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v)
                   for k, v in dict(getattr(model, "hparams", {})).items()}
        path = Path(path)
        atomic_save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, path)
        return path

    @staticmethod
    def _read_checkpoint(path: str) -> dict[str, Tensor]:
        try:
            obj = load_checkpoint(path)
        except (FileNotFoundError, RuntimeError) as exc:
            raise ConfigError("model.checkpoint", path, f"null or a readable checkpoint file ({exc})") from None
        state = obj.get("model", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ConfigError("model.checkpoint", path, "a run checkpoint (its 'model' entry) or a state dict")
        return state
