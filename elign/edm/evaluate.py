"""Evaluation of an EDM on a fixed-seed sample: chemistry and physics of the generated molecules.

The numbers are those of the raw samples (never "repaired"), and the physics (force RMS, energy
per atom under a chosen force field) is reported on its own, separate from any shaped reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from elign.chem.metrics import load_reference_smiles, validity_uniqueness_novelty
from elign.chem.rdkit_mol import smiles_batch
from elign.chem.stability import check_stability_batch, count_fragments
from elign.edm.force_reward import QM9_ATOMIC_NUMBERS
from elign.edm.prompts import QM9_NODE_COUNTS
from elign.edm.reward_terms import aggregate_forces, check_atom_refs, formation_energy
from elign.engine.errors import ConfigError, check_int
from elign.forcefield.base import ForceField


@torch.no_grad()
def sample_molecules(policy: Any, num_samples: int, batch_size: int, seed: int,
                     histogram: Mapping[int, int] = QM9_NODE_COUNTS) -> dict[str, Tensor]:
    """``num_samples`` molecules with node counts from ``histogram``, seeded, in batches.

    Returns:
        ``positions [S, N, 3]`` Å, ``atomic_numbers [S, N]``, ``node_mask [S, N]`` (N = 29 max).
    """
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(list(histogram.keys()))
    probs = torch.tensor(list(histogram.values()), dtype=torch.float64)
    counts = sizes[torch.multinomial(probs, num_samples, replacement=True, generator=g)]
    n_max = int(max(histogram))
    out = {"positions": torch.zeros(num_samples, n_max, 3), "atomic_numbers": torch.zeros(num_samples, n_max, dtype=torch.long),
           "node_mask": torch.zeros(num_samples, n_max, dtype=torch.bool)}
    z_table = torch.tensor(QM9_ATOMIC_NUMBERS)
    torch.manual_seed(seed)
    for start in range(0, num_samples, batch_size):
        chunk = counts[start:start + batch_size]
        rollout = policy.rollout(chunk, 1)
        p = rollout.payload
        n = p["node_mask"].shape[1]
        sl = slice(start, start + len(chunk))
        out["positions"][sl, :n] = p["positions"].float().cpu()
        out["node_mask"][sl, :n] = p["node_mask"].cpu()
        out["atomic_numbers"][sl, :n] = torch.where(p["node_mask"].cpu(), z_table[p["atom_types"].cpu().clamp(0, 4)], 0)
    return out


def score_samples(samples: Mapping[str, Tensor], force_field: ForceField | None = None,
                  atom_refs_ev: Mapping[int, float] | None = None) -> dict[str, Any]:
    """Per-molecule chemistry and physics of samples (the raw samples, never repaired).

    Args:
        samples: ``positions [S, N, 3]`` Å, ``atomic_numbers [S, N]``, ``node_mask [S, N]``.
        force_field: backend for the physics columns; None = chemistry only.
        atom_refs_ev: per-element energies: the energy is then a formation energy.

    Returns:
        ``smiles`` (list, None = invalid), ``molecule_stable [S]``, ``atom_stability`` (float, over all
        atoms), ``fragments [S]`` (connected pieces of the inferred bond graph) and, with a force
        field, ``ff_ok [S]``, ``force_rms [S]`` eV/Å, ``energy_per_atom [S]`` eV.
    """
    pos = samples["positions"].double()
    z, mask = samples["atomic_numbers"].long(), samples["node_mask"].bool()
    z_np, mask_np = np.where(mask.numpy(), z.numpy(), 1), mask.numpy()
    stab = check_stability_batch(pos.numpy(), z_np, mask_np)
    out: dict[str, Any] = {"smiles": smiles_batch(pos.numpy(), z_np, mask_np, bond_orders=stab.bond_orders),
                           "molecule_stable": torch.as_tensor(stab.molecule_stable, dtype=torch.bool),
                           "atom_stability": float(stab.atom_stability),
                           "fragments": torch.as_tensor(count_fragments(stab.bond_orders, mask_np))}
    if force_field is not None:
        res = force_field(pos, z, mask)
        energy = formation_energy(res.energy, z, mask, dict(atom_refs_ev) if atom_refs_ev else None)
        out.update(ff_ok=res.ok.bool(), force_rms=aggregate_forces(res.forces, mask, "rms", None),
                   energy_per_atom=energy / mask.sum(1).clamp(min=1))
    return out


def summarize_scores(scores: Mapping[str, Any], reference: frozenset[str] | None = None) -> dict[str, float]:
    """Sample-level metrics from :func:`score_samples`; physics means are over molecules the force
    field evaluated (``ff_failed_frac`` says how many it could not)."""
    chem = validity_uniqueness_novelty(scores["smiles"], reference)
    stable = scores["molecule_stable"]
    out = {"num_samples": float(len(scores["smiles"])), "molecule_stability": float(stable.double().mean()),
           "atom_stability": scores["atom_stability"], "validity": chem["validity"],
           "uniqueness": chem["uniqueness"], "validity_x_uniqueness": chem["validity"] * chem["uniqueness"]}
    frags = scores["fragments"].double()  # validity is of the largest fragment: say how often there are more
    out.update(connected=float((frags == 1).double().mean()), fragments_per_molecule=float(frags.mean()))
    if chem["novelty"] is not None:
        out["novelty"] = chem["novelty"]
    if "ff_ok" in scores:
        ok, rms = scores["ff_ok"], scores["force_rms"]
        nan = float("nan")
        out.update({"force_rms_ev_per_angstrom": float(rms[ok].mean()) if ok.any() else nan,
                    "force_rms_median_ev_per_angstrom": float(rms[ok].median()) if ok.any() else nan,
                    "energy_per_atom_ev": float(scores["energy_per_atom"][ok].mean()) if ok.any() else nan,
                    "ff_failed_frac": float((~ok).double().mean())})
        if (stable & ok).any():
            out["force_rms_stable_ev_per_angstrom"] = float(rms[stable & ok].mean())
    return out


def evaluate_samples(samples: Mapping[str, Tensor], force_field: ForceField | None = None,
                     reference: frozenset[str] | None = None, atom_refs_ev: Mapping[int, float] | None = None
                     ) -> dict[str, float]:
    """Stability, RDKit validity / uniqueness / novelty, and force-field physics of samples.

    Args:
        samples: ``positions [S, N, 3]``, ``atomic_numbers [S, N]``, ``node_mask [S, N]``.
        force_field: backend for ``force_rms_ev_per_angstrom`` and ``energy_per_atom_ev``; None = skip.
        reference: training SMILES for novelty; None = skip.
        atom_refs_ev: per-element energies: the energy is then a formation energy per atom.
    """
    return summarize_scores(score_samples(samples, force_field, atom_refs_ev), reference)


class SampleEvaluator:
    """Periodic evaluation for the trainer (``evaluator=edm/sample``): a fixed-seed sample every time, so
    ``checkpoint_best.pth`` is chosen on held-out samples, not on the noisy training rollouts."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, force_field: ForceField | None,
                 atom_refs_ev: Mapping[int, float] | None, reference_smiles: str | None) -> None:
        """
        Args:
            num_samples: molecules per evaluation.
            batch_size: molecules sampled at once.
            seed: sampling seed (the same molecules' noise every evaluation).
            force_field: backend for the physics metrics; None = chemistry only.
            atom_refs_ev: per-element reference energies for formation energies; None = total.
            reference_smiles: SMILES file for novelty; None = no novelty.
        """
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed)
        if reference_smiles is not None and not Path(reference_smiles).is_file():
            raise ConfigError("reference_smiles", reference_smiles, "an existing SMILES file, or null")
        self.force_field, self.atom_refs = force_field, check_atom_refs(atom_refs_ev)
        self.reference = load_reference_smiles(reference_smiles) if reference_smiles else None

    def __call__(self, policy: Any) -> dict[str, float]:
        samples = sample_molecules(policy, self.num_samples, self.batch_size, self.seed)
        return evaluate_samples(samples, self.force_field, self.reference, self.atom_refs)
