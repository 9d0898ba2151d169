"""Write predicted coordinates as PDB or mmCIF, for inspection and for external scorers (OpenStructure, DockQ).

Two routes:

* :func:`write_features` (any target, crops included): builds a gemmi Structure from the §1.3 feature dict alone;
  residue names from ``res_type`` (``const.tokens``), atom names from ``ref_atom_name_chars`` (code = one-hot
  index + 32), elements from ``ref_element``, chains from ``asym_id`` (0 -> A, 1 -> B, ...), residue numbers
  ``residue_index + 1``. Ligand tokens are written as residue ``UNL`` (the features do not keep CCD codes).
* :func:`write_structure` (whole, uncropped targets): boltz's own ``to_mmcif`` / ``to_pdb`` on the parsed
  ``StructureV2``, with the coordinates replaced as ``boltz.data.write.writer.BoltzWriter`` does. That relies on
  the featurized atom order being the structure's atom order after ``remove_invalid_chains``, which holds for an
  uncropped target only (a crop keeps the whole structure but featurizes a subset of its tokens).

Both take padded coordinates ``[M,3]`` in the feature atom order and optional per-token pLDDT ``[N]`` in [0,1],
written as B-factors ×100 (boltz's convention; 100 when absent).
"""

from __future__ import annotations

import string
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = ["chain_name", "write_features", "write_structure"]

Format = Literal["cif", "mmcif", "pdb"]
NONPOLYMER = 3  # const.chain_type_ids["NONPOLYMER"]
CHAIN_LETTERS = string.ascii_uppercase + string.ascii_lowercase + string.digits


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _check_format(fmt: str) -> str:
    if fmt not in ("cif", "mmcif", "pdb"):
        raise ValueError(f"fmt must be cif, mmcif or pdb, not {fmt!r}")
    return "pdb" if fmt == "pdb" else "cif"


def chain_name(asym_id: int) -> str:
    """Chain name of an ``asym_id``: A..Z, a..z, 0..9, then two letters (PDB files hold one-letter names only)."""
    n = len(CHAIN_LETTERS)
    if asym_id < n:
        return CHAIN_LETTERS[asym_id]
    return CHAIN_LETTERS[(asym_id // n - 1) % n] + CHAIN_LETTERS[asym_id % n]


def _unbatched(feats: Mapping[str, Any]) -> dict[str, Any]:
    """A flat, unbatched feature dict (accepts the split ``{"inputs", "targets"}`` schema and batch axis 1)."""
    flat = {**feats["inputs"], **feats.get("targets", {})} if "inputs" in feats else dict(feats)
    if torch.is_tensor(flat.get("atom_pad_mask")) and flat["atom_pad_mask"].dim() == 2:
        flat = {k: v[0] if torch.is_tensor(v) else v for k, v in flat.items()}
    return flat


def _atom_names(chars: np.ndarray) -> list[str]:
    """``ref_atom_name_chars [M,4,64]`` one-hot of (code − 32) -> atom names (padding decodes to blanks)."""
    codes = chars.argmax(-1) + 32
    return ["".join(chr(c) for c in row).strip() for row in codes]


def _b_factors(plddt: Tensor | np.ndarray | None, tok: np.ndarray, n_tokens: int) -> np.ndarray:
    """Per-atom B-factors from per-token (``[N]``) or per-atom (``[M]``) pLDDT in [0,1]; 100 when absent."""
    if plddt is None:
        return np.full(len(tok), 100.0)
    p = _numpy(plddt).astype(np.float64).reshape(-1)
    if len(p) == n_tokens:
        return 100.0 * p[tok]
    if len(p) == len(tok):
        return 100.0 * p
    raise ValueError(f"plddt has {len(p)} values; expected {n_tokens} tokens or {len(tok)} atoms")


def _features_to_gemmi(feats: Mapping[str, Any], coords: Tensor | np.ndarray,
                       plddt: Tensor | np.ndarray | None, name: str) -> Any:
    """gemmi Structure of the real (non-padding) atoms of ``feats`` at ``coords [M,3]``."""
    import gemmi
    from boltz.data import const

    f = _unbatched(feats)
    xyz = _numpy(coords).astype(np.float64).reshape(-1, 3)
    real = _numpy(f["atom_pad_mask"]).astype(bool)
    if len(xyz) != len(real):
        raise ValueError(f"coords have {len(xyz)} atoms; the features have {len(real)} (padded)")
    tok = _numpy(f["atom_to_token"]).argmax(-1)
    asym, res_idx = _numpy(f["asym_id"]).astype(int), _numpy(f["residue_index"]).astype(int)
    res_type, mol_type = _numpy(f["res_type"]).argmax(-1), _numpy(f["mol_type"]).astype(int)
    names = _atom_names(_numpy(f["ref_atom_name_chars"]))
    elements = _numpy(f["ref_element"]).argmax(-1)
    bfac = _b_factors(plddt, tok, len(asym))

    chains: dict[int, list[Any]] = {}  # asym_id -> residues, in order of first appearance
    current: tuple[int, int] | None = None
    for m in np.flatnonzero(real):
        t = tok[m]
        key = (int(asym[t]), int(res_idx[t]))
        if key != current:
            residue = gemmi.Residue()
            ligand = mol_type[t] == NONPOLYMER
            residue.name = "UNL" if ligand else const.tokens[res_type[t]]
            residue.seqid = gemmi.SeqId(key[1] + 1, " ")
            residue.het_flag = "H" if ligand else "A"
            residue.subchain = chain_name(key[0])  # label_asym_id = auth_asym_id (else gemmi invents "Axp")
            if not ligand:
                residue.label_seq = key[1] + 1
            chains.setdefault(key[0], []).append(residue)
            current = key
        atom = gemmi.Atom()
        atom.name = names[m]
        atom.element = gemmi.Element(int(elements[m]))
        atom.pos = gemmi.Position(*xyz[m])
        atom.occ = 1.0
        atom.b_iso = float(bfac[m])
        chains[key[0]][-1].add_atom(atom)

    model = gemmi.Model("1")
    for asym_id, residues in chains.items():
        chain = gemmi.Chain(chain_name(asym_id))
        for residue in residues:
            chain.add_residue(residue)
        model.add_chain(chain)
    structure = gemmi.Structure()
    structure.name = name
    structure.add_model(model)
    structure.setup_entities()
    return structure


def write_features(feats: Mapping[str, Any], coords: Tensor | np.ndarray, path: str | Path, fmt: Format = "cif",
                   plddt: Tensor | np.ndarray | None = None, name: str | None = None) -> Path:
    """Write one sample of a featurized (possibly cropped) target with gemmi; returns the path.

    Args:
        feats: the §1.3 feature dict of the target (unbatched, batch axis 1, or the split batch schema).
        coords: ``[M,3]`` padded coordinates in the feature atom order (padding atoms are skipped).
        path: output file. fmt: ``cif`` / ``mmcif`` or ``pdb``.
        plddt: per-token ``[N]`` (or per-atom ``[M]``) pLDDT in [0,1], written as B-factor ×100.
        name: data block / header name (the file stem by default).
    """
    path = Path(path)
    structure = _features_to_gemmi(feats, coords, plddt, name or path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _check_format(fmt) == "pdb":
        structure.write_pdb(str(path))
    else:
        structure.make_mmcif_document().write_file(str(path))
    return path


def write_structure(target_structure: Any, coords: Tensor | np.ndarray, atom_pad_mask: Tensor | np.ndarray,
                    path: str | Path, fmt: Format = "cif", plddt: Tensor | None = None) -> Path:
    """Write one sample with boltz's own writer (``to_mmcif`` / ``to_pdb``), as ``BoltzWriter`` does; returns the path.

    Args:
        target_structure: the target's boltz ``StructureV2`` (``Target.input.structure``), uncropped.
        coords: ``[M,3]`` padded coordinates in the feature atom order. atom_pad_mask: ``[M]``.
        path: output file. fmt: ``cif`` / ``mmcif`` or ``pdb``.
        plddt: per-token ``[N]`` pLDDT in [0,1] (boltz's writers index it per residue).
    Raises:
        ValueError: the unpadded atom count differs from the structure's (a cropped target: use
            :func:`write_features`).
    """
    from boltz.data.types import Coords, Interface
    from boltz.data.write.mmcif import to_mmcif
    from boltz.data.write.pdb import to_pdb

    structure = target_structure.remove_invalid_chains()
    xyz = _numpy(coords).reshape(-1, 3)[_numpy(atom_pad_mask).astype(bool)].astype(np.float32)
    if len(xyz) != len(structure.atoms):
        raise ValueError(f"{len(xyz)} featurized atoms but the structure has {len(structure.atoms)}: boltz's writer "
                         "needs the whole target in structure order (a crop?); use write_features instead")
    atoms = structure.atoms.copy()
    atoms["coords"] = xyz
    atoms["is_present"] = True
    residues = structure.residues.copy()
    residues["is_present"] = True
    new = replace(structure, atoms=atoms, residues=residues, interfaces=np.array([], dtype=Interface),
                  coords=np.array([(x,) for x in xyz], dtype=Coords))
    if plddt is not None and not torch.is_tensor(plddt):
        plddt = torch.as_tensor(np.asarray(plddt))
    writer = to_pdb if _check_format(fmt) == "pdb" else to_mmcif
    text = writer(new, plddts=plddt, boltz2=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
