"""Physics reward of ELIGN: forces and energies from a force field, as separate channels.

Channels (each ``[B]``, NaN where the force field failed for that molecule):

- ``force``: ``-m`` with ``m`` the RMS (or max) atomic force in eV/Å (times the molecule's
  stability flag if ``force_only_if_stable``), plus the stability bonus and minus the valence and
  fragment penalties (these chemistry terms always apply).
- ``energy`` (if ``use_energy``): ``-E~`` with ``E~ = (E_form [/ n] + offset) / scale`` and
  ``E_form = E - sum_a E_ref(Z_a)`` when atom references are given (times the stability flag if
  ``energy_only_if_stable``).

With shaping, the same transforms are applied to the clean molecules predicted along the
trajectory (payload ``z0_pred``), which become the potentials of the ``pbrs_return_to_go``
advantage mode. Failures are never replaced by numbers here: the engine applies the configured
penalty and ``failures`` counts them by reason (``reward/failed_<reason>``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from elign.chem.stability import check_stability_batch, count_fragments
from elign.edm.reward_terms import (
    FORCE_AGGREGATIONS,
    FORCE_SCALES,
    aggregate_forces,
    check_atom_refs,
    formation_energy,
    hard_valence_penalty,
    scale_force,
    soft_valence,
    transform_energy,
)
from elign.edm.shaping import PotentialShaping
from elign.engine.errors import ConfigError, check_finite, check_range
from elign.engine.rollout import RewardOutput, Rollout
from elign.forcefield.base import ForceField

QM9_ATOMIC_NUMBERS = (1, 6, 7, 8, 9)  # atom-type index -> Z (H, C, N, O, F)
N_POS = 3


class ForceFieldReward:
    """Force and energy channels from any :class:`elign.forcefield.base.ForceField` backend."""

    def __init__(
        self,
        force_field: ForceField,
        force_aggregation: str,
        force_clip_ev_per_angstrom: float | None,
        use_energy: bool,
        atom_refs_ev: Mapping[int, float] | None,
        energy_per_atom: bool,
        energy_offset_ev: float,
        energy_scale_ev: float,
        energy_clip: float | None,
        stability_weight: float,
        atom_stability_weight: float,
        underbond_weight: float,
        overbond_weight: float,
        soft_underbond_weight: float,
        soft_overbond_weight: float,
        soft_temperature_angstrom: float,
        force_only_if_stable: bool,
        energy_only_if_stable: bool,
        fragment_weight: float = 0.0,
        shaping: PotentialShaping | None = None,
        force_scale: str = "linear",
    ) -> None:
        """
        Args:
            force_field: the backend (xtb, mmff, uma, dummy).
            force_aggregation: "rms" or "max" over atoms of the force norms.
            force_clip_ev_per_angstrom: per-atom force-norm clip before aggregation; None = off.
            use_energy: emit the ``energy`` channel.
            atom_refs_ev: atomic number -> isolated-atom energy (eV) for formation energies; None = total.
            energy_per_atom: divide the energy by the atom count.
            energy_offset_ev, energy_scale_ev: ``E~ = (E + offset) / scale``.
            energy_clip: clamp ``E~`` to ``[-clip, clip]``; None = off.
            stability_weight: ``w_s`` of the molecule-stability bonus ``w_s (2 s - 1)``.
            atom_stability_weight: ``w_a`` of ``-w_a (1 - atom_stability)``.
            underbond_weight, overbond_weight: hard valence penalty per missing / excess bond order.
            soft_underbond_weight, soft_overbond_weight: the same on sigmoid bond orders.
            soft_temperature_angstrom: sigmoid width of the soft bond orders.
            force_only_if_stable: multiply the pure force term by the stability flag.
            energy_only_if_stable: multiply the energy channel (and its potentials) by the flag.
            fragment_weight: penalty per connected piece beyond the first. Pulling a molecule apart
                lowers its forces, so without it a force reward can be gamed by fragmentation (seen
                in a 30-iteration xTB run: 1.7 -> 2.6 pieces per molecule).
            shaping: score the predicted clean molecules along the trajectory; None = terminal only.
            force_scale: "linear" (``-m``, the paper's) or "log" (``-ln m``, see ``scale_force``); the
                logged force metrics stay in eV/Å.
        """
        if force_aggregation not in FORCE_AGGREGATIONS:
            raise ConfigError("force_aggregation", force_aggregation, FORCE_AGGREGATIONS)
        if force_scale not in FORCE_SCALES:
            raise ConfigError("force_scale", force_scale, FORCE_SCALES)
        self.force_scale = force_scale
        positive = {"low": 0.0, "low_open": True}
        self.force_clip = check_range("force_clip_ev_per_angstrom", force_clip_ev_per_angstrom, **positive,
                                      allow_none=True, none_means="off")
        self.energy_offset = check_finite("energy_offset_ev", energy_offset_ev)
        self.energy_scale = check_range("energy_scale_ev", energy_scale_ev, **positive)
        self.energy_clip = check_range("energy_clip", energy_clip, **positive, allow_none=True, none_means="off")
        self.w_fragment = check_range("fragment_weight", fragment_weight, 0.0)  # 0 = off
        self.soft_tau = check_range("soft_temperature_angstrom", soft_temperature_angstrom, **positive)
        # Signed weights: a negative value flips a term, which is odd but has a meaning; NaN has none.
        self.w_stable, self.w_atom = check_finite("stability_weight", stability_weight), \
            check_finite("atom_stability_weight", atom_stability_weight)
        self.w_under, self.w_over = check_finite("underbond_weight", underbond_weight), \
            check_finite("overbond_weight", overbond_weight)
        self.w_soft_under, self.w_soft_over = check_finite("soft_underbond_weight", soft_underbond_weight), \
            check_finite("soft_overbond_weight", soft_overbond_weight)
        if shaping is not None and "energy" in shaping.channels and not use_energy:
            raise ConfigError("shaping.channels", shaping.channels, "no 'energy' entry unless use_energy is true")
        self.force_field = force_field
        self.force_aggregation = force_aggregation
        self.use_energy = bool(use_energy)
        self.atom_refs = check_atom_refs(atom_refs_ev)
        self.energy_per_atom = energy_per_atom
        self.force_only_if_stable, self.energy_only_if_stable = force_only_if_stable, energy_only_if_stable
        self.shaping = shaping

    # -- physics of one padded batch ------------------------------------------------------------

    def physics(self, positions: Tensor, numbers: Tensor, mask: Tensor) -> dict[str, Any]:
        """Force metric ``[B]`` (eV/Å), transformed energy ``[B]``, and the raw force-field result."""
        result = self.force_field(positions, numbers, mask)
        force = aggregate_forces(result.forces, mask, self.force_aggregation, self.force_clip)
        energy = transform_energy(formation_energy(result.energy, numbers, mask, self.atom_refs),
                                  mask.sum(dim=1), self.energy_per_atom, self.energy_offset, self.energy_scale,
                                  self.energy_clip)
        return {"force": force, "energy": energy, "result": result}

    def __call__(self, rollout: Rollout) -> RewardOutput:
        payload = rollout.payload
        mask = payload["node_mask"].bool()
        z_table = torch.tensor(QM9_ATOMIC_NUMBERS, device=mask.device)
        numbers = torch.where(mask, z_table[payload["atom_types"].clamp(0, len(QM9_ATOMIC_NUMBERS) - 1)], 0)
        positions = payload["positions"].double()
        phys = self.physics(positions, numbers, mask)
        result = phys["result"]

        pos_np, z_np, mask_np = positions.cpu().numpy(), numbers.cpu().numpy(), mask.cpu().numpy()
        stab = check_stability_batch(pos_np, np.where(mask_np, z_np, 1), mask_np)
        stable = torch.as_tensor(stab.molecule_stable, dtype=torch.float64)
        atom_stab = torch.as_tensor(stab.atom_stability_per_molecule, dtype=torch.float64)
        hard = torch.as_tensor(hard_valence_penalty(stab.valence, np.where(mask_np, z_np, 1), mask_np,
                                                    self.w_under, self.w_over))
        fragments = torch.as_tensor(count_fragments(stab.bond_orders, mask_np), dtype=torch.float64)
        chem_terms = (self.w_stable * (2.0 * stable - 1.0) - self.w_atom * (1.0 - atom_stab) - hard
                      - self.w_fragment * (fragments - 1.0).clamp(min=0.0))
        if self.w_soft_under or self.w_soft_over:
            soft_missing, soft_excess = soft_valence(pos_np, z_np, mask_np, self.soft_tau)
            chem_terms = chem_terms - torch.as_tensor(self.w_soft_under * soft_missing + self.w_soft_over * soft_excess)

        gate_f = stable if self.force_only_if_stable else torch.ones_like(stable)
        gate_e = stable if self.energy_only_if_stable else torch.ones_like(stable)
        channels = {"force": (-scale_force(phys["force"].cpu(), self.force_scale) * gate_f + chem_terms).float()}
        if self.use_energy:
            channels["energy"] = (-phys["energy"].cpu() * gate_e).float()

        ok = result.ok.cpu()
        metrics = {
            "rollout/molecule_stability": float(stable.mean()),
            "rollout/atom_stability": float(stab.atom_stability),
            "rollout/fragments_per_molecule": float(fragments.mean()),
            "force_rms_ev_per_angstrom" if self.force_aggregation == "rms" else "force_max_ev_per_angstrom":
                float(phys["force"].cpu()[ok].mean()) if ok.any() else float("nan"),
            "ff_ok_frac": float(ok.double().mean()),
            "valence_penalty": float(hard.mean()),
        }
        if self.use_energy:
            metrics["energy_transformed"] = float(phys["energy"].cpu()[ok].mean()) if ok.any() else float("nan")
        out = RewardOutput(channels={k: v.to(rollout.logp_old.device) for k, v in channels.items()},
                           failures={f"ff_{k}": v for k, v in result.reason_counts().items()}, metrics=metrics)
        if self.shaping is not None:
            self._add_potentials(rollout, out, gate_e)
        return out

    # -- shaping ----------------------------------------------------------------------------

    def _add_potentials(self, rollout: Rollout, out: RewardOutput, gate_energy: Tensor) -> None:
        """Potentials at the scheduled columns from the predicted clean molecules ``z0_pred``."""
        if "z0_pred" not in rollout.payload:
            raise ConfigError("reward.shaping", "enabled", "only with model.record_z0_pred=true (no z0_pred recorded)")
        z0 = rollout.payload["z0_pred"]  # [B, T, N, 3 + F]
        mask = rollout.payload["node_mask"].bool()
        b, t = z0.shape[:2]
        first_trained = int(torch.nonzero(rollout.step_mask.any(dim=0))[0])
        columns = self.shaping.scheduler(t, first_trained)
        cols = torch.nonzero(columns).squeeze(1).tolist()
        z_table = torch.tensor(QM9_ATOMIC_NUMBERS, device=z0.device)
        flat = [(i, j) for j in cols for i in range(b)]
        pot = {c: torch.full((b, t), float("nan"), dtype=torch.float64) for c in self.shaping.channels}
        failures: dict[str, int] = {}
        for start in range(0, len(flat), self.shaping.batch_size):
            chunk = flat[start:start + self.shaping.batch_size]
            bi = torch.tensor([i for i, _ in chunk])
            tj = torch.tensor([j for _, j in chunk])
            lat = z0[bi, tj]  # [c, N, 3 + F]
            m = mask[bi]
            types = lat[..., N_POS:N_POS + len(QM9_ATOMIC_NUMBERS)].argmax(dim=-1)
            numbers = torch.where(m, z_table[types], 0)
            phys = self.physics(lat[..., :N_POS].double(), numbers, m)
            if "energy" in pot:
                pot["energy"][bi, tj] = -phys["energy"].cpu() * gate_energy[bi]
            if "force" in pot:
                pot["force"][bi, tj] = -scale_force(phys["force"].cpu(), self.force_scale)
            for reason, count in phys["result"].reason_counts().items():
                failures[f"shaping_{reason}"] = failures.get(f"shaping_{reason}", 0) + count
        out.potentials = {c: v.float().to(rollout.logp_old.device) for c, v in pot.items()}
        out.potential_mask = columns.to(rollout.logp_old.device)
        out.failures.update(failures)
        out.metrics["shaping_evaluations"] = float(len(flat))
