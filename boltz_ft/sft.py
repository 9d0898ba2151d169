"""Boltz-2's structure-training objective on the re-composed forward: one ``nn.Module`` DDP can wrap.

Total loss (boltz.md §2.1, boltz's ``training_step`` weights):
``diffusion_weight · (λ(σ)-weighted aligned MSE + smooth lDDT) + distogram_weight · distogram CE
+ confidence_weight · (pLDDT + PDE + resolved + α_pae · PAE CE)``. The terms are boltz's own loss
functions (``AtomDiffusion.compute_loss``, ``loss.distogramv2.distogram_loss``,
``loss.confidencev2.confidence_loss``); what differs from upstream's broken ``training_step`` is only the
composition: no forced reverse sampling unless the confidence term is on, no mutation of the batch.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from elign.engine.errors import ConfigError, check_int, check_range
from boltz_ft.core import Boltz2Core
from boltz_ft.losses import distogram_ce, mean_loss  # for a non-Boltz2 backend (fallback)

__all__ = ["Boltz2SFT"]


class Boltz2SFT(nn.Module):
    """The official model and its SFT forward (``forward(feats, recycling_steps) -> losses``).

    Args:
        model: the official ``Boltz2``.
        diffusion_multiplicity: noise levels (denoise steps) per structure and trunk pass (Boltz-2 trains
            with 32; the tiny CPU recipe uses a few).
        diffusion_weight, distogram_weight, confidence_weight: boltz's structure-training weights
            (4.0, 0.03, 1e-4).
        add_smooth_lddt_loss, nucleotide_loss_weight, ligand_loss_weight: boltz's ``diffusion_loss_args``.
        confidence_samples: samples drawn (no gradient) for the confidence targets; 0 = no confidence term.
        sampling_steps: reverse-sampler steps of those samples.
    """

    def __init__(self, model: nn.Module, diffusion_multiplicity: int = 4, diffusion_weight: float = 4.0,
                 distogram_weight: float = 0.03, confidence_weight: float = 1e-4, add_smooth_lddt_loss: bool = True,
                 nucleotide_loss_weight: float = 5.0, ligand_loss_weight: float = 10.0, confidence_samples: int = 0,
                 sampling_steps: int = 20) -> None:
        super().__init__()
        self.model = model
        self.multiplicity = check_int("diffusion_multiplicity", diffusion_multiplicity, 1)
        self.weights = {k: check_range(k, v, 0) for k, v in (("diffusion_weight", diffusion_weight),
                                                               ("distogram_weight", distogram_weight),
                                                               ("confidence_weight", confidence_weight))}
        self.diffusion_loss_args = {"add_smooth_lddt_loss": bool(add_smooth_lddt_loss),
                                    "nucleotide_loss_weight": check_range("nucleotide_loss_weight",
                                                                          nucleotide_loss_weight, 0),
                                    "ligand_loss_weight": check_range("ligand_loss_weight", ligand_loss_weight, 0)}
        self.confidence_samples = check_int("confidence_samples", confidence_samples, 0)
        self.sampling_steps = check_int("sampling_steps", sampling_steps, 1)
        if self.confidence_samples and not getattr(model, "confidence_prediction", False):
            raise ConfigError("confidence_samples", confidence_samples, "0 for a model built without a confidence head")

    @property
    def core(self) -> Any:
        """``Boltz2Core`` of the official model; a model with its own core interface (``trunk``, ``denoise``,
        ``diffusion_loss``, ``sample``, ``confidence``: :class:`boltz_ft.fallback.FallbackBoltz`) is its own core."""
        # Non-Boltz2 backend (fallback): the model is the core.
        return self.model if hasattr(self.model, "trunk") else Boltz2Core(self.model)

    def forward(self, feats: Mapping[str, Tensor], recycling_steps: int = 0, denoise: Mapping[str, Any] | None = None
                ) -> dict[str, Tensor]:
        """The SFT losses of one batch (``feats`` with batch axis; ``coords`` ``[B, 1, M, 3]``), or, with
        ``denoise``, one denoiser call (GRPO's log-probs): DDP wraps this one ``forward`` for both.

        Args:
            denoise: ``{"x_noisy": [n, M, 3], "sigma": [n], "multiplicity": n, "trunk": Trunk | None}`` for one
                target; a None trunk is recomputed here (with gradients into trunk adapters).
        Returns:
            ``loss`` (the weighted total, with grad) and the detached terms ``diffusion``, ``mse``,
            ``smooth_lddt``, ``distogram`` and, with confidence samples, ``confidence`` and its parts; with
            ``denoise``, ``{"denoised": [n, M, 3]}``.
        """
        core = self.core
        if denoise is not None:
            trunk = denoise.get("trunk") or core.trunk(feats, recycling_steps)
            return {"denoised": core.denoise(trunk, feats, denoise["x_noisy"], denoise["sigma"],
                                             int(denoise["multiplicity"]))}
        trunk = core.trunk(feats, recycling_steps)
        aggregate = getattr(self.model, "aggregate_distogram", True)
        if isinstance(core, Boltz2Core):
            from boltz.model.loss.distogramv2 import distogram_loss

            distogram, _ = distogram_loss({"pdistogram": trunk.pdistogram}, feats, aggregate_distogram=aggregate)
        else:  # non-Boltz2 backend (fallback): the same CE without importing boltz (tests/boltz_ft/test_losses.py)
            distogram = mean_loss(distogram_ce(trunk.pdistogram, feats["disto_target"], feats["token_disto_mask"],
                                               aggregate=aggregate))
        diffusion, parts = core.diffusion_loss(trunk, feats, self.multiplicity, **self.diffusion_loss_args)
        total = self.weights["diffusion_weight"] * diffusion + self.weights["distogram_weight"] * distogram
        terms = {"diffusion": diffusion, "distogram": distogram,
                 "mse": parts["mse_loss"], "smooth_lddt": parts["smooth_lddt_loss"]}
        if self.confidence_samples:
            confidence, conf_parts = self._confidence_loss(core, trunk, feats)
            total = total + self.weights["confidence_weight"] * confidence
            terms.update({"confidence": confidence, **{f"confidence_{k}": v for k, v in conf_parts.items()}})
        return {"loss": total, **{k: torch.as_tensor(v).detach() for k, v in terms.items()}}

    def _confidence_loss(self, core: Boltz2Core, trunk: Any, feats: Mapping[str, Tensor]) -> tuple[Tensor, dict]:
        """boltz's confidence loss on ``confidence_samples`` samples against the (un-permuted) truth, the
        non-symmetric branch of ``Boltz2.get_true_coordinates``; one target per batch, as boltz asserts."""
        from boltz.model.loss.confidencev2 import confidence_loss

        if feats["coords"].shape[0] != 1:
            raise ValueError(f"the confidence term takes one target per batch; got {feats['coords'].shape[0]}")
        samples = self.confidence_samples
        coords = core.sample(trunk, feats, self.sampling_steps, samples)
        out = core.confidence(trunk, feats, coords, samples)
        out["sample_atom_coords"] = coords
        true = feats["coords"][0, 0].expand(samples, -1, -1)  # [S, M, 3]
        true_mask = feats["atom_resolved_mask"].repeat_interleave(samples, 0)
        conf_feats = dict(feats)
        conf_feats["frames_idx"] = feats["frames_idx"].squeeze(1)
        conf_feats["frame_resolved_mask"] = feats["frame_resolved_mask"].squeeze(1)
        result = confidence_loss(out, conf_feats, true, true_mask, multiplicity=samples,
                                 token_level_confidence=getattr(self.model, "token_level_confidence", True),
                                 alpha_pae=float(getattr(self.model, "alpha_pae", 0.0)))
        # The relative-confidence terms are 0 unless relative supervision is on (it is not here).
        parts = {k.removesuffix("_loss"): v for k, v in result["loss_breakdown"].items() if not k.startswith("rel_")}
        return result["loss"], parts
