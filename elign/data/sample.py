"""The embedded QM9 sample: a few thousand QM9 molecules with xTB geometries shipped inside the package.

Users have no network, so the default configs train and evaluate on this sample instead of the QM9
release (which ``elign.data.qm9`` reads when a user brings it). The files in ``qm9_sample/`` are
written by ``scripts/build_qm9_sample.py`` (their ``README.md`` records how); the layout of
``qm9_sample.npz`` (flat ragged: molecule ``i`` is rows ``offsets[i]:offsets[i+1]``):

    format_version  int32 scalar (:data:`FORMAT_VERSION`)
    positions       float32 [atoms, 3], Angstrom, GFN2-xTB relaxed, not centred
    atomic_numbers  int8 [atoms] (H, C, N, O, F)
    num_atoms       int8 [M]; offsets int64 [M + 1]
    energy_ev       float64 [M], GFN2-xTB total energy in eV
    source_line     int32 [M], 1-based line of the molecule in ``qm9_smiles.txt``
    train_idx, valid_idx, test_idx   int32, sorted positions into the M molecules (a partition)

``smiles.txt`` holds the M canonical SMILES in the same order (the novelty reference).

Only numpy and torch are needed to read it (no RDKit/xTB).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elign.data.dataset import QM9Dataset
from elign.data.qm9 import QM9Molecule
from elign.engine.errors import ConfigError, DataFormatError

__all__ = [
    "BUILD_COMMAND",
    "DEFAULT_SAMPLE_DIR",
    "FORMAT_VERSION",
    "QM9SampleDataset",
    "load_qm9_sample",
    "sample_node_histogram",
    "sample_smiles",
]

FORMAT_VERSION = 1
NPZ_NAME = "qm9_sample.npz"
SMILES_NAME = "smiles.txt"
SOURCE_NAME = "source_smiles.txt"
DEFAULT_SAMPLE_DIR = Path(__file__).resolve().parent / "qm9_sample"
BUILD_COMMAND = ".venv/bin/python scripts/build_qm9_sample.py --workers 2"
SAMPLE_SPLITS = ("train", "valid", "test", "all")
_KEYS = ("format_version", "positions", "atomic_numbers", "num_atoms", "offsets", "energy_ev", "source_line",
         "train_idx", "valid_idx", "test_idx")
_QM9_Z = (1, 6, 7, 8, 9)


def _rebuild_hint(folder: Path) -> str:
    # Name the output folder explicitly when it is not the shipped one, so the hint rebuilds *it*.
    out = "" if folder.resolve() == DEFAULT_SAMPLE_DIR else f" --out {folder}"
    return f"rebuild it from the repository root with: {BUILD_COMMAND}{out}"


def _sample_dir(path: str | os.PathLike[str] | None) -> Path:
    """The sample folder; ``path`` may also name the ``.npz`` inside it."""
    folder = DEFAULT_SAMPLE_DIR if path is None else Path(path)
    return folder.parent if folder.suffix == ".npz" else folder


def _read_npz(file: Path, hint: str) -> dict[str, np.ndarray]:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: embedded QM9 sample not found; {hint}")
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise DataFormatError(str(file), None, f"unreadable or corrupt ({type(err).__name__}: {err}); {hint}") \
            from None


def _check(file: Path, data: dict[str, np.ndarray], hint: str) -> None:
    """Consistency of the arrays; a failure names the file, the field and the rebuild command."""
    def bad(reason: str) -> DataFormatError:
        return DataFormatError(str(file), None, f"{reason}; {hint}")

    missing = [k for k in _KEYS if k not in data]
    if missing:
        raise bad(f"missing array(s) {', '.join(missing)}")
    if int(data["format_version"]) != FORMAT_VERSION:
        raise bad(f"format_version {int(data['format_version'])}, this code reads {FORMAT_VERSION}")
    pos, z, counts, offsets = data["positions"], data["atomic_numbers"], data["num_atoms"], data["offsets"]
    m = counts.shape[0]
    if pos.ndim != 2 or pos.shape[1] != 3 or z.shape != (pos.shape[0],):
        raise bad(f"positions {pos.shape} and atomic_numbers {z.shape} do not describe [atoms, 3] / [atoms]")
    if not np.isfinite(pos).all():
        raise bad("positions contain NaN or inf")
    if counts.ndim != 1 or (counts < 1).any():
        raise bad("num_atoms must be a vector of positive counts")
    expected = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    if offsets.shape != (m + 1,) or not np.array_equal(offsets, expected) or expected[-1] != pos.shape[0]:
        raise bad(f"offsets do not match num_atoms ({m} molecules, {pos.shape[0]} atoms)")
    if not np.isin(z, _QM9_Z).all():
        raise bad(f"atomic numbers {sorted(set(z.tolist()) - set(_QM9_Z))} outside H, C, N, O, F")
    for key in ("energy_ev", "source_line"):
        if data[key].shape != (m,):
            raise bad(f"{key} has shape {data[key].shape}, expected ({m},)")
    split = np.concatenate([data[f"{s}_idx"] for s in SAMPLE_SPLITS[:3]])
    if not np.array_equal(np.sort(split), np.arange(m)):
        raise bad("train_idx, valid_idx and test_idx are not a partition of the molecules")


def load_qm9_sample(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read and check the sample.

    Args:
        path: the sample folder (or its ``qm9_sample.npz``); ``None`` = the copy shipped in the package.

    Returns:
        ``{"path": folder, "smiles": [M] list of str, "splits": {"train"|"valid"|"test": int array}}``
        plus every array of the ``.npz`` (module docstring) under its own name.

    Raises:
        FileNotFoundError: a file is missing (the message names it and the build command).
        DataFormatError: a file is corrupt or inconsistent (names the file and what is wrong).
    """
    folder = _sample_dir(path)
    hint = _rebuild_hint(folder)
    npz_file = folder / NPZ_NAME
    data = _read_npz(npz_file, hint)
    _check(npz_file, data, hint)
    smiles_file = folder / SMILES_NAME
    if not smiles_file.is_file():
        raise FileNotFoundError(f"{smiles_file}: SMILES of the embedded QM9 sample not found; {hint}")
    try:
        smiles = smiles_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataFormatError(str(smiles_file), None, f"not UTF-8 text ({err.reason}); {hint}") from None
    m = data["num_atoms"].shape[0]
    if len(smiles) != m:
        raise DataFormatError(str(smiles_file), None, f"{len(smiles)} lines for the {m} molecules of "
                              f"{NPZ_NAME}; {hint}")
    blank = next((i for i, s in enumerate(smiles) if not s.strip()), None)
    if blank is not None:
        raise DataFormatError(str(smiles_file), blank + 1, f"empty SMILES; {hint}")
    out: dict[str, Any] = dict(data)
    out.update(path=folder, smiles=smiles,
               splits={s: data[f"{s}_idx"].astype(np.int64) for s in SAMPLE_SPLITS[:3]})
    return out


def _split_index(sample: dict[str, Any], split: str) -> np.ndarray:
    if split not in SAMPLE_SPLITS:
        raise ConfigError("split", split, SAMPLE_SPLITS)
    if split == "all":
        return np.arange(sample["num_atoms"].shape[0])
    return sample["splits"][split]


class QM9SampleDataset(QM9Dataset):
    """One split of the embedded sample, with exactly :class:`~elign.data.dataset.QM9Dataset`'s items.

    Items are dicts with ``positions`` ``[n, 3]`` (centred when ``center``), ``one_hot`` ``[n, 5]``,
    ``charges`` ``[n, 1]``, ``node_mask`` ``[n]`` and ``index`` = the molecule's 1-based line in
    ``qm9_smiles.txt`` (the sample's analogue of the GDB index); batch them with
    :func:`~elign.data.dataset.collate_qm9`.

    Args:
        split: ``train``, ``valid``, ``test`` or ``all``.
        path: sample folder (``None``: the shipped one).
        center: subtract each molecule's mean position.
        max_atoms, dtype: as for ``QM9Dataset``.

    Attributes:
        smiles: the split's SMILES, in item order; energies_ev: ``[len]`` xTB energies (eV).
    """

    def __init__(
        self,
        split: str = "train",
        path: str | os.PathLike[str] | None = None,
        center: bool = True,
        max_atoms: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        sample = load_qm9_sample(path)
        idx = _split_index(sample, split)
        off, pos, z = sample["offsets"], sample["positions"], sample["atomic_numbers"]
        npz = sample["path"] / NPZ_NAME
        molecules = [
            QM9Molecule(
                index=int(sample["source_line"][i]),
                positions=pos[off[i]:off[i + 1]].astype(np.float64),
                atomic_numbers=z[off[i]:off[i + 1]].astype(np.int64),
                properties={},  # QM9's 15 DFT properties do not exist for xTB geometries
                smiles=sample["smiles"][i],
                name=f"{npz}[{i}]",
            )
            for i in idx.tolist()
        ]
        super().__init__(molecules, center=center, max_atoms=max_atoms, dtype=dtype)
        self.split = split
        self.smiles = [sample["smiles"][i] for i in idx.tolist()]
        self.energies_ev = sample["energy_ev"][idx].astype(np.float64)


def sample_node_histogram(split: str = "train", path: str | os.PathLike[str] | None = None) -> dict[int, int]:
    """``{atom count (H included): molecules}`` of a split, ascending (the prompt size distribution)."""
    sample = load_qm9_sample(path)
    counts = sample["num_atoms"][_split_index(sample, split)].astype(np.int64)
    values, freq = np.unique(counts, return_counts=True)
    return {int(v): int(f) for v, f in zip(values, freq)}


def sample_smiles(split: str = "train", path: str | os.PathLike[str] | None = None) -> list[str]:
    """Canonical SMILES of a split in sample order (the novelty reference is the training split)."""
    sample = load_qm9_sample(path)
    return [sample["smiles"][i] for i in _split_index(sample, split).tolist()]
