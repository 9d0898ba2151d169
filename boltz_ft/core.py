"""``Boltz2Core``: Boltz-2's forward re-composed from its public sub-modules (boltz.md §1.5).

Upstream ``Boltz2.forward`` runs a full reverse sampling plus the confidence head on every training
step, raises with ``confidence_prediction=False``, keeps gradients only under its own flags and
mutates its input dict. Re-composing it gives us the pieces separately:

1. :meth:`trunk`: input embedder, single/pair initialisation, recycling, MSA module, pairformer,
   distogram, and the diffusion conditioning (once per target; reused by every denoise step and by
   the G samples of a GRPO group).
2. :meth:`denoise`: one preconditioned denoiser call ``D(x, sigma)`` with gradients.
3. :meth:`diffusion_loss`: boltz's training denoise step and EDM loss (noise levels drawn as boltz does,
   ``multiplicity`` copies per structure).
4. :meth:`sample`: boltz's own reverse sampler, steering off.
5. :meth:`confidence`: the confidence head on sampled coordinates.

Every method takes a feature dict and never mutates it (a shallow copy is made where boltz would).
The :class:`Boltz2SFT` module wraps the core's SFT forward so that DDP can wrap one ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from boltz_ft.backend import STEERING_OFF

__all__ = ["Boltz2Core", "Trunk"]


@dataclass
class Trunk:
    """The trunk's outputs for one batch of targets (B targets, N tokens).

    Attributes:
        s_inputs: ``[B, N, token_s]`` embedded inputs.
        s: ``[B, N, token_s]`` single representation after the pairformer.
        z: ``[B, N, N, token_z]`` pair representation after the pairformer.
        pdistogram: ``[B, N, N, 1, num_bins]`` distogram logits.
        conditioning: the diffusion module's pair biases and atom conditioning (``q``, ``c``,
            ``to_keys``, ``atom_enc_bias``, ``atom_dec_bias``, ``token_trans_bias``).
    """

    s_inputs: Tensor
    s: Tensor
    z: Tensor
    pdistogram: Tensor
    conditioning: dict[str, Any]

    def detached(self) -> "Trunk":
        """The same trunk with no gradient path into the trunk's weights (score-model-only training)."""
        cond = {k: v.detach() if torch.is_tensor(v) else v for k, v in self.conditioning.items()}
        return Trunk(self.s_inputs.detach(), self.s.detach(), self.z.detach(), self.pdistogram.detach(), cond)


class Boltz2Core:
    """The official ``Boltz2``'s sub-modules, called in the order of its forward (see module docstring).

    Args:
        model: a ``boltz.model.models.boltz2.Boltz2`` (built or loaded by :mod:`boltz_ft.backend`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def sigma_data(self) -> float:
        return float(self.model.structure_module.sigma_data)

    def trunk(self, feats: Mapping[str, Tensor], recycling_steps: int = 0, grad: bool = True) -> Trunk:
        """Embed, recycle ``recycling_steps`` times (only the last pass keeps gradients, as boltz), distogram,
        diffusion conditioning.

        Args:
            feats: the §1.3 feature dict with batch axis (``[B, ...]``).
            recycling_steps: extra trunk passes fed back through ``s_recycle`` / ``z_recycle``.
            grad: keep gradients of the last pass (False: the whole trunk under no_grad).
        """
        m = self.model
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            s_inputs = m.input_embedder(feats)
            s_init = m.s_init(s_inputs)
            z_init = m.z_init_1(s_inputs)[:, :, None] + m.z_init_2(s_inputs)[:, None, :]
            rel_pos = m.rel_pos(feats)
            z_init = z_init + rel_pos + m.token_bonds(feats["token_bonds"].float())
            if m.bond_type_feature:
                z_init = z_init + m.token_bonds_type(feats["type_bonds"].long())
            z_init = z_init + m.contact_conditioning(feats)
            s, z = torch.zeros_like(s_init), torch.zeros_like(z_init)
            mask = feats["token_pad_mask"].float()
            pair_mask = mask[:, :, None] * mask[:, None, :]
            kernels = dict(use_kernels=m.use_kernels)
            for i in range(recycling_steps + 1):
                with torch.set_grad_enabled(torch.is_grad_enabled() and i == recycling_steps):
                    s = s_init + m.s_recycle(m.s_norm(s))
                    z = z_init + m.z_recycle(m.z_norm(z))
                    if m.use_templates:
                        z = z + m.template_module(z, feats, pair_mask, **kernels)
                    z = z + m.msa_module(z, s_inputs, feats, **kernels)
                    s, z = m.pairformer_module(s, z, mask=mask, pair_mask=pair_mask, **kernels)
            pdistogram = m.distogram_module(z)
            q, c, to_keys, enc_bias, dec_bias, trans_bias = m.diffusion_conditioning(
                s_trunk=s, z_trunk=z, relative_position_encoding=rel_pos, feats=feats)
        conditioning = {"q": q, "c": c, "to_keys": to_keys, "atom_enc_bias": enc_bias, "atom_dec_bias": dec_bias,
                        "token_trans_bias": trans_bias}
        return Trunk(s_inputs, s, z, pdistogram, conditioning)

    def _network_kwargs(self, trunk: Trunk, feats: Mapping[str, Tensor], multiplicity: int) -> dict[str, Any]:
        return {"s_inputs": trunk.s_inputs.float(), "s_trunk": trunk.s.float(), "feats": feats,
                "multiplicity": multiplicity, "diffusion_conditioning": trunk.conditioning}

    def denoise(self, trunk: Trunk, feats: Mapping[str, Tensor], x_noisy: Tensor, sigma: Tensor,
                multiplicity: int) -> Tensor:
        """EDM denoiser ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``.

        Args:
            x_noisy: ``[B * multiplicity, M, 3]`` noised coordinates (copies of a target adjacent).
            sigma: ``[B * multiplicity]`` noise levels (Angstrom).
        Returns:
            ``[B * multiplicity, M, 3]`` denoised coordinates.
        """
        return self.model.structure_module.preconditioned_network_forward(
            x_noisy, sigma, network_condition_kwargs=self._network_kwargs(trunk, feats, multiplicity))

    @staticmethod
    def step_features(feats: Mapping[str, Tensor], multiplicity: int) -> dict[str, Tensor]:
        """A copy of ``feats`` with ``coords`` ``[B, 1, M, 3]`` repeated to ``[B * multiplicity, M, 3]``, the
        layout boltz's training step and its losses read (its forward overwrites the caller's dict instead)."""
        coords = feats["coords"]
        if coords.dim() != 4 or coords.shape[1] != 1:
            raise ValueError(f"coords must be [B, 1, M, 3] (one conformer); got {tuple(coords.shape)}")
        step = dict(feats)
        step["coords"] = coords[:, 0].repeat_interleave(multiplicity, 0)
        return step

    def diffusion_loss(self, trunk: Trunk, feats: Mapping[str, Tensor], multiplicity: int,
                       **loss_args: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """boltz's training denoise step and its EDM loss.

        The step draws ``multiplicity`` noise levels per structure from boltz's log-normal and noises the
        centred, randomly rotated truth; ``AtomDiffusion.compute_loss`` then takes the λ(σ)-weighted MSE
        after Kabsch alignment with atom weights 1 + 5·nucleotide + 10·ligand, plus smooth lDDT.

        Args:
            feats: with ``coords`` ``[B, 1, M, 3]`` (one conformer).
            **loss_args: ``add_smooth_lddt_loss``, ``nucleotide_loss_weight``, ``ligand_loss_weight``.
        Returns:
            the loss (mean over the ``B * multiplicity`` copies) and ``mse_loss`` / ``smooth_lddt_loss``.
        """
        step = self.step_features(feats, multiplicity)
        module = self.model.structure_module
        out = module(s_inputs=trunk.s_inputs.float(), s_trunk=trunk.s.float(), feats=step, multiplicity=multiplicity,
                     diffusion_conditioning=trunk.conditioning)
        result = module.compute_loss(step, out, multiplicity=multiplicity, **loss_args)
        return result["loss"], dict(result["loss_breakdown"])

    @torch.no_grad()
    def sample(self, trunk: Trunk, feats: Mapping[str, Tensor], num_sampling_steps: int,
               diffusion_samples: int = 1) -> Tensor:
        """boltz's reverse sampler (steering off): ``[B * diffusion_samples, M, 3]`` coordinates."""
        out = self.model.structure_module.sample(
            s_trunk=trunk.s.float(), s_inputs=trunk.s_inputs.float(), feats=dict(feats),
            num_sampling_steps=num_sampling_steps, atom_mask=feats["atom_pad_mask"].float(),
            multiplicity=diffusion_samples, steering_args=dict(STEERING_OFF), diffusion_conditioning=trunk.conditioning)
        return out["sample_atom_coords"]

    def confidence(self, trunk: Trunk, feats: Mapping[str, Tensor], coords: Tensor,
                   diffusion_samples: int = 1, detach_trunk: bool = True) -> dict[str, Tensor]:
        """The confidence head (pLDDT, PDE, PAE, resolved, pTM/ipTM) on ``coords`` ``[B * S, M, 3]``."""
        m = self.model
        if not getattr(m, "confidence_prediction", False):
            raise ValueError("this Boltz2 was built with confidence_prediction: false (no confidence head)")

        def cut(t: Tensor) -> Tensor:
            return t.detach() if detach_trunk else t

        return m.confidence_module(s_inputs=cut(trunk.s_inputs), s=cut(trunk.s), z=cut(trunk.z), x_pred=coords.detach(),
                                   feats=dict(feats), pred_distogram_logits=cut(trunk.pdistogram[:, :, :, 0]),
                                   multiplicity=diffusion_samples, use_kernels=m.use_kernels)
