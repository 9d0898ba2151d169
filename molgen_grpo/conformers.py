"""RDKit conformer ensembles in 3DMolGen's data layout: the offline stand-in for GEOM (spec §1.4, §4).

One molecule (:func:`build_ensemble`): SMILES -> stereoisomer to embed -> ETKDGv3 ensemble (seeded,
never with RDKit's ``randomSeed=0``, which makes every conformer identical) -> MMFF94 relaxation ->
3D stereo check -> energy order -> greedy RMS pruning -> at most ``max_confs`` conformers.

- Stereo: a source SMILES that leaves stereo unassigned (QM9 does this for ~12 % of lines, e.g. an
  aziridine nitrogen or an imine's E/Z) would let ETKDG pick a random stereoisomer per conformer and
  mix diastereomers in one ensemble under one prompt. We fix one: the isomers of
  ``EnumerateStereoisomers(onlyUnassigned=True)`` are tried in canonical-SMILES order and the first
  that embeds is used; its isomeric SMILES is the molecule's ``canonical_smiles``.
- Relaxation: MMFF94 (``MMFFOptimizeMoleculeConfs``); conformers that do not converge within
  ``mmff_max_iters`` are dropped, and so are those whose stereo perceived from 3D changed during
  relaxation (the text must describe the geometry). ETKDG itself enforces the SMILES's tetrahedral
  and double-bond stereo while embedding; RDKit perceives no stereo of ring nitrogens from 3D, so an
  inverted aziridine nitrogen would go unnoticed (MMFF minimisation does not cross that barrier).
- Pruning: conformers sorted by MMFF energy; one is kept if its heavy-atom, symmetry-aware RMSD
  (``rdMolAlign.GetBestRMS`` over graph automorphisms, after alignment) to every kept one is at
  least ``prune_rms``; the lowest-energy member of each cluster survives. Then the ``max_confs``
  lowest (3DMolGen keeps GEOM's 30 lowest-energy conformers, ``sort_by="energy"``). GEOM's CREST
  ensembles are pruned differently: CREST's CREGEN sorts metadynamics/GFN2-xTB structures into
  conformers and rotamers by energy, RMSD and rotational constants within an energy window (by
  default 6 kcal/mol, RMSD 0.125 Å), so GEOM keeps many more, closer conformers than a 0.5 Å cut.
- Output: :func:`write_dataset` writes 3DMolGen's preprocessing layout: ``<split>.jsonl`` with one
  conformer per line ``{"canonical_smiles", "embedded_smiles"}`` (:func:`molgen_grpo.text.encode`),
  one reference pickle per molecule (a list of single-conformer RDKit molecules with hydrogens, lowest
  energy first, as 3DMolGen's GRPO ``load_ground_truths`` reads them) and ``smiles_to_pickle.json``
  (canonical SMILES -> pickle path relative to the folder).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import rdDistGeom, rdForceFieldHelpers, rdMolAlign
from rdkit.Chem.EnumerateStereoisomers import EnumerateStereoisomers, StereoEnumerationOptions

from molgen_grpo.text import DEFAULT_PRECISION, encode

__all__ = ["ENERGY_PROP", "LINE_PROP", "MAPPING_NAME", "REASONS", "REFERENCE_DIR", "SPLITS", "Ensemble",
           "EnsembleSettings", "build_ensemble", "embed_seed", "heavy_rmsd", "jsonl_records", "prune",
           "split_molecules", "write_dataset"]

#: Every status a molecule can end with; all but ``kept`` are drop reasons.
REASONS: dict[str, str] = {
    "kept": "at least one conformer survived",
    "unparsable": "RDKit cannot parse the source SMILES",
    "embed_failed": "ETKDGv3 found no conformer within max_attempts tries per conformer, for every stereoisomer "
                    "tried (strained fused small rings with tight stereo constraints)",
    "no_mmff_params": "MMFF94 has no parameters for an atom type",
    "mmff_not_converged": "no conformer's MMFF94 relaxation converged within mmff_max_iters",
    "stereo_changed": "MMFF94 relaxation changed the 3D stereo of every conformer",
    "duplicate": "same canonical SMILES as an earlier drawn line (after fixing unassigned stereo)",
    "error": "an exception (type and message in the detail)",
}
ENERGY_PROP = "mmff94_energy_kcal_mol"  # double property of each reference conformer
LINE_PROP = "source_line"  # int property: 1-based line of the SMILES file
MAPPING_NAME = "smiles_to_pickle.json"
REFERENCE_DIR = "references"
SPLITS = ("train", "valid", "test")
MAX_STEREOISOMERS = 8  # stereoisomers tried before giving up on embedding
_SEED_MODULUS = 2**31 - 2  # RDKit seeds are C ints; +1 keeps them >= 1 (0 gives identical conformers)


@dataclass(frozen=True)
class EnsembleSettings:
    """How one ensemble is built (all recorded in the dataset README)."""

    num_embed: int = 50  # ETKDGv3 conformers requested before relaxation and pruning
    max_attempts: int = 10  # ETKDG tries per requested conformer (RDKit's maxIterations; 0 = 10 x atoms)
    prune_rms: float = 0.5  # Å, heavy-atom symmetry-aware RMSD below which a higher-energy conformer goes
    max_confs: int = 30  # conformers kept per molecule (3DMolGen / torsional diffusion: 30)
    mmff_max_iters: int = 2000  # MMFF94 optimizer steps per conformer

    def __post_init__(self) -> None:
        for name in ("num_embed", "max_confs", "mmff_max_iters"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EnsembleSettings.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_attempts < 0 or self.prune_rms < 0:
            raise ValueError(f"EnsembleSettings.max_attempts and prune_rms must be >= 0, got "
                             f"{self.max_attempts!r}, {self.prune_rms!r}")


@dataclass
class Ensemble:
    """One drawn molecule: its status and, when kept, its conformers (lowest energy first)."""

    line: int  # 1-based line of the SMILES file
    source_smiles: str  # the line as drawn
    status: str = "error"  # a key of REASONS
    detail: str = ""  # free text for failures
    smiles: str = ""  # canonical isomeric SMILES of the H-free molecule (the prompt)
    conformers: list[Chem.Mol] = field(default_factory=list)  # hydrogens explicit, one conformer each
    embedded: int = 0  # ETKDG conformers obtained
    converged: int = 0  # of those, MMFF-converged with unchanged stereo
    stereo_fixed: bool = False  # the source left stereo unassigned and one isomer was chosen

    @property
    def energies(self) -> list[float]:
        return [m.GetDoubleProp(ENERGY_PROP) for m in self.conformers]


def embed_seed(seed: int, line: int) -> int:
    """ETKDG's ``randomSeed`` for the molecule on ``line``: in [1, 2**31 - 2], never 0 (see module doc)."""
    return 1 + (int(seed) * 1_000_003 + int(line)) % _SEED_MODULUS


def _stereoisomers(mol: Chem.Mol) -> list[Chem.Mol]:
    """``mol`` itself if its stereo is fully assigned, else its isomers in canonical-SMILES order."""
    options = StereoEnumerationOptions(onlyUnassigned=True, unique=True)
    isomers = list(EnumerateStereoisomers(mol, options=options))
    return sorted(isomers, key=Chem.MolToSmiles) if len(isomers) > 1 else [mol]


def _embed(mol: Chem.Mol, seed: int, settings: EnsembleSettings) -> tuple[Chem.Mol, list[int]]:
    with_h = Chem.AddHs(mol)
    params = rdDistGeom.ETKDGv3()
    params.randomSeed = seed
    params.maxIterations = settings.max_attempts
    params.numThreads = 1  # deterministic and polite: the build runs next to training jobs
    params.pruneRmsThresh = -1.0  # prune after relaxation, where nearby embeddings have converged
    return with_h, list(rdDistGeom.EmbedMultipleConfs(with_h, settings.num_embed, params))


def _stereo_smiles(mol: Chem.Mol, conf_id: int) -> str:
    """Canonical isomeric H-free SMILES with the stereo RDKit perceives from conformer ``conf_id``."""
    probe = Chem.Mol(mol, confId=conf_id)
    Chem.AssignStereochemistryFrom3D(probe, confId=conf_id)
    return Chem.MolToSmiles(Chem.RemoveHs(probe))


def heavy_rmsd(a: Chem.Mol, b: Chem.Mol) -> float:
    """Heavy-atom RMSD (Å) of two single-conformer molecules of one graph, over graph automorphisms,
    after optimal alignment (copies are aligned; the inputs stay as they are)."""
    return float(rdMolAlign.GetBestRMS(Chem.RemoveHs(a), Chem.RemoveHs(b)))


def prune(mol: Chem.Mol, conf_ids: Sequence[int], threshold: float, limit: int) -> list[int]:
    """Greedy RMS pruning of ``conf_ids`` (already in energy order): keep a conformer if its heavy-atom
    symmetry-aware RMSD to every kept one is >= ``threshold``; stop at ``limit`` kept."""
    heavy = Chem.RemoveHs(mol)  # a copy: GetBestRMS moves the probe conformer while aligning
    kept: list[int] = []
    for conf_id in conf_ids:
        if all(rdMolAlign.GetBestRMS(heavy, heavy, conf_id, k) >= threshold for k in kept):
            kept.append(conf_id)
            if len(kept) == limit:
                break
    return kept


def build_ensemble(smiles: str, line: int, seed: int, settings: EnsembleSettings = EnsembleSettings()) -> Ensemble:
    """The relaxed, pruned ensemble of one SMILES; never raises (every outcome is a status)."""
    result = Ensemble(line=int(line), source_smiles=smiles)
    try:
        _build(result, seed, settings)
    except Exception as err:  # noqa: BLE001 - recorded with its type and counted by the build
        result.status, result.detail = "error", f"{type(err).__name__}: {err}"[:300]
        result.conformers = []
    return result


def _build(result: Ensemble, seed: int, settings: EnsembleSettings) -> None:
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(result.source_smiles)
    if mol is None:
        result.status = "unparsable"
        return
    isomers = _stereoisomers(mol)
    result.stereo_fixed = len(isomers) > 1
    for isomer in isomers[:MAX_STEREOISOMERS]:
        with_h, conf_ids = _embed(isomer, embed_seed(seed, result.line), settings)
        if conf_ids:
            break
    else:
        result.status = "embed_failed"
        result.detail = f"{min(len(isomers), MAX_STEREOISOMERS)} stereoisomer(s) tried"
        return
    result.embedded = len(conf_ids)
    if not rdForceFieldHelpers.MMFFHasAllMoleculeParams(with_h):
        result.status = "no_mmff_params"
        return
    embedded = Chem.Mol(with_h)  # ETKDG's geometries, whose stereo matches the SMILES (enforced while embedding)
    outcomes = rdForceFieldHelpers.MMFFOptimizeMoleculeConfs(with_h, numThreads=1, maxIters=settings.mmff_max_iters)
    energies = {cid: energy for cid, (not_converged, energy) in zip(conf_ids, outcomes) if not_converged == 0}
    if not energies:
        result.status = "mmff_not_converged"
        return
    good = [cid for cid in energies if _stereo_smiles(with_h, cid) == _stereo_smiles(embedded, cid)]
    result.converged = len(good)
    if not good:
        result.status = "stereo_changed"
        return
    order = sorted(good, key=lambda cid: (energies[cid], cid))
    for cid in prune(with_h, order, settings.prune_rms, settings.max_confs):
        conformer = Chem.Mol(with_h, confId=cid)
        conformer.GetConformer().SetId(0)
        conformer.SetDoubleProp(ENERGY_PROP, float(energies[cid]))
        conformer.SetIntProp(LINE_PROP, result.line)
        result.conformers.append(conformer)
    smiles = {encode(m).smiles for m in result.conformers}
    if len(smiles) != 1:  # cannot happen: the graph and stereo tags are the isomer's for every conformer
        raise ValueError(f"conformers encode to {len(smiles)} different SMILES: {sorted(smiles)}")
    result.smiles, result.status = smiles.pop(), "kept"


def jsonl_records(ensemble: Ensemble, precision: int = DEFAULT_PRECISION) -> list[dict[str, str]]:
    """One ``{"canonical_smiles", "embedded_smiles"}`` record per conformer (3DMolGen's JSONL line)."""
    records = []
    for mol in ensemble.conformers:
        smiles, enriched = encode(mol, precision=precision)
        records.append({"canonical_smiles": smiles, "embedded_smiles": enriched})
    return records


def split_molecules(count: int, seed: int, fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, list[int]]:
    """Seeded split of ``count`` molecules by position: ``default_rng(seed).permutation``, the first
    ``round(0.8 count)`` train, the next ``round(0.1 count)`` valid, the rest test; each sorted."""
    perm = np.random.default_rng(seed).permutation(count)
    n_train, n_valid = round(fractions[0] * count), round(fractions[1] * count)
    parts = (perm[:n_train], perm[n_train:n_train + n_valid], perm[n_train + n_valid:])
    return {name: sorted(int(i) for i in part) for name, part in zip(SPLITS, parts)}


@contextlib.contextmanager
def _pickle_all_properties() -> Iterator[None]:
    """RDKit pickles drop molecule properties unless told otherwise; restore the global setting after."""
    previous = Chem.GetDefaultPickleProperties()
    Chem.SetDefaultPickleProperties(Chem.PropertyPickleOptions.AllProps)
    try:
        yield
    finally:
        Chem.SetDefaultPickleProperties(previous)


def _reference_name(split: str, line: int) -> str:
    return f"{REFERENCE_DIR}/{split}/line{line:06d}.pickle"


def write_dataset(out: str | Path, molecules: Sequence[Ensemble], splits: dict[str, Sequence[int]],
                  reference_splits: Sequence[str] = ("valid", "test"),
                  precision: int = DEFAULT_PRECISION) -> dict[str, Any]:
    """Write the JSONL files, the reference pickles and the mapping into ``out``.

    Args:
        out: output folder (created; an earlier ``references/`` folder in it is replaced).
        molecules: kept ensembles; ``splits`` holds positions into this list.
        splits: ``{"train": [...], "valid": [...], "test": [...]}`` (see :func:`split_molecules`).
        reference_splits: splits whose molecules get a reference pickle and a mapping entry.
        precision: decimals per coordinate in the enriched strings.
    Returns:
        Per split: molecules, conformers (JSONL lines) and references written.
    Raises:
        ValueError: a molecule is not kept, a split name is unknown, a position repeats across
            splits, or two molecules share a canonical SMILES (the mapping would be ambiguous).
    """
    out = Path(out)
    unknown = sorted(set(splits) - set(SPLITS)) + sorted(set(reference_splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; expected {list(SPLITS)}")
    positions = [p for split in splits.values() for p in split]
    if len(positions) != len(set(positions)):
        raise ValueError("a molecule is in more than one split")
    smiles = [m.smiles for m in molecules]
    if len(set(smiles)) != len(smiles):
        raise ValueError("two molecules share a canonical SMILES; drop duplicates before writing")
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / REFERENCE_DIR, ignore_errors=True)
    mapping: dict[str, str] = {}
    counts: dict[str, Any] = {}
    for split in SPLITS:
        members = [molecules[i] for i in splits.get(split, ())]
        lines = 0
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for mol in members:
                if mol.status != "kept" or not mol.conformers:
                    raise ValueError(f"line {mol.line} ({mol.source_smiles}) has status {mol.status!r}, not kept")
                for record in jsonl_records(mol, precision):
                    handle.write(json.dumps(record) + "\n")
                    lines += 1
        if split in reference_splits:
            (out / REFERENCE_DIR / split).mkdir(parents=True, exist_ok=True)
            with _pickle_all_properties():
                for mol in members:
                    name = _reference_name(split, mol.line)
                    with open(out / name, "wb") as handle:
                        pickle.dump(list(mol.conformers), handle, protocol=pickle.HIGHEST_PROTOCOL)
                    mapping[mol.smiles] = name
        counts[split] = {"molecules": len(members), "conformers": lines,
                         "references": len(members) if split in reference_splits else 0}
    (out / MAPPING_NAME).write_text(json.dumps(dict(sorted(mapping.items())), indent=1) + "\n", encoding="utf-8")
    return counts
