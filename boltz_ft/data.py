"""Structure files -> boltz's own parse -> tokenize -> crop -> featurize path, offline.

The residue molecules come from :class:`boltz_ft.ccd.CCDMolecules` (biotite's bundled CCD) instead of
boltz's downloaded ``mols/`` directory. MSAs are query-only unless an ``.a3m`` file is given per chain.
The result is the §1.3 feature dict of one target, split into the batch schema of the engine's
strategies (:func:`split_batch`): ``{"inputs", "targets", "meta"}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from elign.engine.errors import DataFormatError
from boltz_ft.ccd import CCDMolecules

__all__ = ["TARGET_KEYS", "Target", "featurize", "load_structure", "split_batch", "stack_batches"]

TARGET_KEYS = ("coords", "atom_resolved_mask", "disto_target", "disto_coords_ensemble", "frames_idx",
               "frame_resolved_mask", "token_resolved_mask", "bfactor", "plddt")
"""Feature keys that hold the ground truth (read by the losses and the evaluation, never by the trunk)."""

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
CROP_ATTEMPTS = 8  # redraws of an empty crop before giving up


@dataclass
class Target:
    """One parsed target: boltz's ``Input`` (structure, MSAs, record) and where it came from.

    Attributes:
        id: the target's name (file stem or record id).
        input: ``boltz.data.types.Input`` with a ``StructureV2``, ``{chain_id: MSA}`` and a ``Record``.
        sequences: chain name -> one-letter sequence (protein chains).
        source: ``pdb`` (a structure file) or ``rcsb`` (boltz's processed layout).
    """

    id: str
    input: Any
    sequences: dict[str, str] = field(default_factory=dict)
    source: str = "pdb"


def _record(target_id: str, structure: Any, info: Any, msa_ids: Mapping[int, int] | None = None) -> Any:
    from boltz.data.types import ChainInfo, Record

    chains = [ChainInfo(chain_id=int(c["asym_id"]), chain_name=str(c["name"]), mol_type=int(c["mol_type"]),
                        cluster_id=-1, msa_id=(msa_ids or {}).get(int(c["asym_id"]), -1),
                        num_residues=int(c["res_num"]), entity_id=int(c["entity_id"]))
              for c in structure.chains]
    return Record(id=target_id, structure=info, chains=chains, interfaces=[])


def load_structure(path: str | Path, mols: CCDMolecules | None = None,
                   a3m: Mapping[str, str | Path] | None = None, max_msa_seqs: int = 4096) -> Target:
    """Parse a PDB or mmCIF file with boltz's parser (asymmetric unit, residue molecules from the CCD).

    Args:
        path: ``.pdb`` / ``.ent`` / ``.cif`` / ``.mmcif`` file.
        mols: the CCD molecule cache (shared across targets; a new one if None).
        a3m: chain name -> ``.a3m`` file of that chain's MSA (others are query-only).
        max_msa_seqs: rows read from each ``.a3m``.
    Raises:
        FileNotFoundError: ``path`` or an ``.a3m`` file is missing.
        DataFormatError: the file has an unknown suffix or boltz's parser rejects it (names the file).
    """
    from boltz.data.parse.a3m import parse_a3m
    from boltz.data.parse.mmcif import parse_mmcif
    from boltz.data.parse.pdb import parse_pdb
    from boltz.data.types import Input

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no structure file at {path}")
    if path.suffix.lower() not in STRUCTURE_SUFFIXES:
        raise DataFormatError(str(path), None, f"unknown structure suffix; expected one of {STRUCTURE_SUFFIXES}")
    mols = CCDMolecules() if mols is None else mols
    # compute_interfaces=False: the fork's parse_mmcif shadows a variable there and crashes (boltz.md §1.5);
    # use_assembly=False: the file's asymmetric unit (1ubq's assembly names a subchain A2 the file lacks).
    options = dict(mols=mols, moldir=None, compute_interfaces=False, use_assembly=False)
    try:
        parser = parse_pdb if path.suffix.lower() in (".pdb", ".ent") else parse_mmcif
        parsed = parser(str(path), **options)
    except (ValueError, KeyError, RuntimeError, AssertionError) as exc:
        raise DataFormatError(str(path), None, f"boltz's parser rejected it: {exc}") from exc
    structure = parsed.data
    msas, msa_ids = {}, {}
    names = {str(c["name"]): int(c["asym_id"]) for c in structure.chains}
    for chain, a3m_path in dict(a3m or {}).items():
        if chain not in names:
            raise DataFormatError(str(path), None, f"a3m given for chain {chain!r}; chains are {sorted(names)}")
        a3m_path = Path(a3m_path)
        if not a3m_path.is_file():
            raise FileNotFoundError(f"no a3m file at {a3m_path} (chain {chain} of {path})")
        msas[names[chain]] = parse_a3m(a3m_path, taxonomy=None, max_seqs=max_msa_seqs)
        msa_ids[names[chain]] = names[chain]
    record = _record(path.stem, structure, parsed.info, msa_ids)
    return Target(id=path.stem, input=Input(structure, msas, record=record), sequences=dict(parsed.sequences))


def featurize(target: Target, mols: CCDMolecules, seed: int, max_tokens: int | None = None,
              max_atoms: int | None = None, max_seqs: int = 64, training: bool = True,
              crop_neighborhood: tuple[int, int] = (0, 40)) -> dict[str, Tensor]:
    """boltz's tokenizer, cropper and v2 featurizer on one target: the §1.3 feature dict, unbatched.

    Args:
        target: from :func:`load_structure` or the processed-layout reader.
        mols: CCD molecules (boltz's ``molecules`` argument).
        seed: seeds the crop, the reference-conformer rotations and MSA sampling.
        max_tokens: crop to this many tokens with boltz's ``BoltzCropper`` (spatial / contiguous mix
            over ``crop_neighborhood``) and pad to it; None = the whole target, unpadded.
        max_atoms: pad atoms to this many (a multiple of 32); None = the target's own (rounded up to 32).
        max_seqs: MSA rows kept.
        training: boltz's training-mode featurisation (random MSA subsampling, augmentation).
        crop_neighborhood: (min, max) neighbourhood of boltz's cropper.
    """
    from boltz.data.crop.boltz import BoltzCropper
    from boltz.data.feature.featurizerv2 import Boltz2Featurizer
    from boltz.data.tokenize.boltz2 import Boltz2Tokenizer

    from boltz_ft.msa import deletion_preserving_pairing

    rng = np.random.default_rng(seed)
    tokenized = Boltz2Tokenizer().tokenize(target.input)
    if max_tokens is not None and len(tokenized.tokens) > max_tokens:
        cropper = BoltzCropper(*crop_neighborhood)
        # boltz's cropper draws with the legacy RandomState API (randint), the featurizer with a Generator.
        # A crop can come back empty (boltz's training loader then skips the sample): redraw, a few times.
        full, crop_rng = tokenized, np.random.RandomState(seed)
        for _ in range(CROP_ATTEMPTS):
            tokenized = cropper.crop(full, max_tokens=max_tokens, random=crop_rng, max_atoms=max_atoms)
            if len(tokenized.tokens):
                break
        else:
            raise DataFormatError(target.id, None, f"boltz's cropper returned no token in {CROP_ATTEMPTS} attempts "
                                                   f"(max_tokens={max_tokens}, max_atoms={max_atoms})")
    names = set(tokenized.tokens["res_name"].tolist())
    molecules = {name: mols.get(name) for name in names}
    missing = sorted(n for n, m in molecules.items() if m is None)
    if missing:
        raise DataFormatError(target.id, None, f"residues {missing} are not in the Chemical Component Dictionary")
    # The reference-conformer rotations come from torch's global RNG: seed it too, so a seed is a crop.
    with deletion_preserving_pairing(), torch.random.fork_rng():
        torch.manual_seed(seed)
        feats = Boltz2Featurizer().process(
            tokenized, random=rng, molecules=molecules, training=training, max_seqs=max_seqs,
            max_tokens=max_tokens, max_atoms=max_atoms, compute_frames=True, pad_to_max_seqs=False)
    return feats


def split_batch(feats: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's batch schema: model inputs, ground truth and metadata of one target (batch axis 1)."""
    batched = {k: v.unsqueeze(0) for k, v in feats.items() if torch.is_tensor(v)}
    targets = {k: batched.pop(k) for k in TARGET_KEYS if k in batched}
    return {"inputs": batched, "targets": targets, "meta": dict(meta)}


RAGGED_KEYS = ("r_set_to_rep_atom",)
"""Features boltz does not pad to ``max_tokens``: ``r_set_to_rep_atom`` ``[R, M]`` has one row per resolved
polymer token. Only boltz's confidence loss reads it, and that loss takes one target per batch."""


def stack_batches(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Several same-size batches (same padded token and atom counts) along the batch axis.

    Raises:
        ValueError: two batches differ in a padded shape (crops of different ``max_tokens`` / ``max_atoms``).
    """
    out: dict[str, Any] = {"inputs": {}, "targets": {}, "meta": {}}
    for part in ("inputs", "targets"):
        for key in batches[0][part]:
            tensors = [b[part][key] for b in batches]
            if key in RAGGED_KEYS:  # zero rows to the longest (no row maps to an atom)
                rows = max(t.shape[1] for t in tensors)
                tensors = [torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[1])) for t in tensors]
            if len({t.shape[1:] for t in tensors}) > 1:
                raise ValueError(f"cannot stack {key}: shapes {sorted({tuple(t.shape) for t in tensors})}")
            out[part][key] = torch.cat(tensors, dim=0)
    for key in batches[0]["meta"]:
        out["meta"][key] = [b["meta"][key] for b in batches]
    return out
