"""GEOM-Drugs as 3DMolGen's users have it: ``rdkit_folder/drugs/*.pickle`` plus a torsional-diffusion split.

Files (GEOM's ``rdkit_folder.tar.gz``, Axelrod & Gómez-Bombarelli 2022): one pickle per molecule,
``drugs/<smiles>.pickle`` with ``/`` in the SMILES replaced by ``_`` (a few over-long names differ).
Each holds a dict such as::

    {"smiles": str, "uniqueconfs": int, "totalconfs": int, "charge": int, ...,
     "conformers": [{"rd_mol": Mol, "totalenergy": float, "boltzmannweight": float,
                     "relativeenergy": float, "geom_id": int, "degeneracy": int, ...}, ...]}

where every ``rd_mol`` is the molecule with explicit hydrogens and one conformer. They are read with
the restricted unpickler of :mod:`molgen_grpo.pickles`.

Split convention, as the two upstream codes use it (torsional-diffusion ``utils/dataset.py``,
``ConformerDataset.preprocess_datapoints``; 3DMolGen ``preprocess_geom_grouped.py``): the split file
(e.g. ``split_boltz_10k.npy``, ``split.npy``) loads as a sequence of three integer arrays, position
0 = train, 1 = val (3DMolGen calls it "valid"), 2 = test. Each array holds positions into
``sorted(glob(<drugs folder>/*.pickle))``, i.e. the pickle file names in Python string (code point)
order, hidden files excluded; both codes sort the positions before use, and so does this reader.
``summary_drugs.json`` is not involved. The positions mean something only for the complete folder
the split was made for: with a partial copy they silently name other molecules, and only an
out-of-range position can reveal it (that raises).

Conformers are kept lowest ``totalenergy`` first (3DMolGen's default ``sort_by="energy"``; GEOM
files are usually in that order already), at most ``max_confs`` per molecule (spec §1.4: 30). No
chemistry filter is applied here (e.g. 3DMolGen's "no atom with more than 4 neighbours" or
torsional-diffusion's "conformer graph equals the SMILES graph"): that belongs to preprocessing.
"""

from __future__ import annotations

import glob
import math
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rdkit import Chem

from elign.engine.errors import ConfigError, DataFormatError, check_int
from molgen_grpo.pickles import load_npy, load_pickle

__all__ = ["DEFAULT_MAX_CONFS", "SPLITS", "GeomMolecule", "iter_split", "list_molecules", "read_molecule",
           "read_split"]

SPLITS = ("train", "val", "test")  # position in the split file
DEFAULT_MAX_CONFS = 30  # 3DMolGen's GEOM-Drugs preprocessing (spec §1.4)


@dataclass(frozen=True)
class GeomMolecule:
    """One GEOM molecule with its kept conformers, lowest energy first."""

    name: str  # file name without ".pickle"
    smiles: str  # the pickle's "smiles" (GEOM's SMILES, not canonicalised here)
    conformers: tuple[Chem.Mol, ...]  # each with explicit H and one conformer, as GEOM stores them
    energies: tuple[float | None, ...]  # "totalenergy" (Hartree), None where the file has none
    weights: tuple[float | None, ...]  # "boltzmannweight", None where the file has none


def list_molecules(folder: str | os.PathLike[str]) -> list[Path]:
    """The molecule pickles of ``folder`` in the order split positions refer to.

    Same as upstream's ``sorted(glob(folder/'*.pickle'))``: Python string order, dot-files skipped.
    """
    return [Path(p) for p in sorted(glob.glob(os.path.join(glob.escape(os.fspath(folder)), "*.pickle")))]


def read_split(path: str | os.PathLike[str], split: str) -> np.ndarray:
    """Sorted file positions of ``split`` (``"train"``, ``"val"`` or ``"test"``) from a split ``.npy``.

    Accepts both shapes the file can have: an object array of three integer arrays (unequal
    lengths), or a ``[3, n]`` integer array.

    Raises:
        ConfigError: ``split`` is not one of :data:`SPLITS`.
        DataFormatError: the file does not hold three 1-D arrays of non-negative integers.
    """
    if split not in SPLITS:
        raise ConfigError("split", split, SPLITS)
    where = str(path)
    table = load_npy(path)
    if table.ndim == 0 or len(table) != len(SPLITS):
        raise DataFormatError(where, None, f"expected {len(SPLITS)} index arrays ({', '.join(SPLITS)}), got an "
                              f"array of shape {table.shape}")
    indices = np.asarray(table[SPLITS.index(split)])
    if indices.dtype == object:  # an object array of Python ints
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in indices.ravel()):
            raise DataFormatError(where, None, f"{split} indices are not all integers")
        indices = indices.astype(np.int64)
    if indices.ndim != 1 or indices.dtype.kind not in "iu" or (indices.size and indices.min() < 0):
        raise DataFormatError(where, None, f"{split} indices must be a 1-D array of non-negative integers, got "
                              f"dtype {indices.dtype} and shape {indices.shape}")
    return np.sort(indices.astype(np.int64))


def _number(value: object, path: str, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise DataFormatError(path, None, f"{what} must be a finite number, got {value!r}")
    return float(value)


def read_molecule(path: str | os.PathLike[str], max_confs: int = DEFAULT_MAX_CONFS) -> GeomMolecule:
    """One GEOM molecule pickle with its ``max_confs`` lowest-energy conformers.

    Conformers without ``totalenergy`` come after those with one; ties keep the file order.

    Raises:
        ConfigError: ``max_confs`` is not a positive integer.
        ForbiddenGlobalError: the pickle names a global other than RDKit / container / numpy ones.
        DataFormatError: the pickle is not a GEOM molecule dict (the message names the conformer).
    """
    max_confs = check_int("max_confs", max_confs, 1)
    where = str(path)
    record = load_pickle(path)
    if not isinstance(record, dict) or not isinstance(record.get("smiles"), str):
        raise DataFormatError(where, None, "expected a GEOM molecule dict with a 'smiles' string")
    entries = record.get("conformers")
    if not isinstance(entries, list):
        raise DataFormatError(where, None, f"'conformers' must be a list, got {type(entries).__name__}")
    rows = []
    for index, entry in enumerate(entries):
        mol = entry.get("rd_mol") if isinstance(entry, dict) else None
        if not isinstance(mol, Chem.Mol) or mol.GetNumConformers() == 0:
            raise DataFormatError(where, None, f"conformer {index}: expected a dict whose 'rd_mol' is an RDKit "
                                  "molecule with a conformer")
        energy = _number(entry.get("totalenergy"), where, f"conformer {index} 'totalenergy'")
        weight = _number(entry.get("boltzmannweight"), where, f"conformer {index} 'boltzmannweight'")
        rows.append((math.inf if energy is None else energy, index, mol, energy, weight))
    kept = sorted(rows, key=lambda row: row[:2])[:max_confs]
    return GeomMolecule(
        name=Path(path).name.removesuffix(".pickle"),
        smiles=record["smiles"],
        conformers=tuple(row[2] for row in kept),
        energies=tuple(row[3] for row in kept),
        weights=tuple(row[4] for row in kept),
    )


def iter_split(
    folder: str | os.PathLike[str],
    split_file: str | os.PathLike[str],
    split: str,
    max_confs: int = DEFAULT_MAX_CONFS,
) -> Iterator[GeomMolecule]:
    """The molecules of one split, in sorted-position order, read one pickle at a time.

    ``folder`` is the directory holding the molecule pickles (``rdkit_folder/drugs``). The folder,
    the split file and ``max_confs`` are checked when this is called; each pickle when it is reached.

    Raises:
        ConfigError: bad ``split`` or ``max_confs``.
        DataFormatError: the folder has no pickles, a split position is beyond its file count, or
            (while iterating) a pickle is malformed.
    """
    max_confs = check_int("max_confs", max_confs, 1)
    files = list_molecules(folder)
    if not files:
        raise DataFormatError(str(folder), None, "no *.pickle molecule files in this folder")
    positions = read_split(split_file, split)
    if positions.size and positions[-1] >= len(files):
        raise DataFormatError(str(split_file), None, f"{split} position {int(positions[-1])} is out of range for "
                              f"the {len(files)} molecule files in {folder} (a split indexes the complete "
                              "GEOM folder it was made for)")
    return (read_molecule(files[position], max_confs) for position in positions)
