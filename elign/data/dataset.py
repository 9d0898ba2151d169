"""Torch dataset of QM9 molecules in EDM's input layout, and a collate that pads per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from elign.data.qm9 import QM9Molecule, load_qm9
from elign.engine.errors import ConfigError, check_int

# Atom-type channels of EDM's QM9 model (dataset_info 'qm9_with_h' atom_encoder): H 0, C 1, N 2, O 3, F 4.
ATOM_DECODER: tuple[int, ...] = (1, 6, 7, 8, 9)
_ENCODER = torch.full((10,), -1, dtype=torch.long)
for _channel, _z in enumerate(ATOM_DECODER):
    _ENCODER[_z] = _channel


class QM9Dataset(Dataset):
    """Molecules as tensors.

    Item ``i`` is a dict (``n`` = the molecule's atom count, or ``max_atoms`` when given):
        ``positions`` ``[n, 3]`` float, Angstrom; centred on the mean of the real atoms when
        ``center`` (EDM works in the zero-centre-of-mass subspace; the mean is unweighted there);
        ``one_hot`` ``[n, 5]`` float over (H, C, N, O, F);
        ``charges`` ``[n, 1]`` float, the atomic number (not normalised: EDM divides by 10 later);
        ``node_mask`` ``[n]`` bool, True on real atoms;
        ``index`` int64 scalar, the GDB index.
    Padding rows are zero.

    Args:
        molecules: parsed molecules (``load_qm9``).
        center: subtract the mean position.
        max_atoms: pad every item to this many atoms (None: no padding; ``collate_qm9`` pads per batch).
        dtype: float dtype of the tensors.
    """

    def __init__(
        self,
        molecules: Sequence[QM9Molecule],
        center: bool = True,
        max_atoms: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.molecules = list(molecules)
        self.center = bool(center)
        self.dtype = dtype
        largest = max((m.num_atoms for m in self.molecules), default=0)
        self.max_atoms = check_int("max_atoms", max_atoms, largest, allow_none=True,
                                   none_means="pad per batch")

    def __len__(self) -> int:
        return len(self.molecules)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        mol = self.molecules[i]
        n = mol.num_atoms
        size = n if self.max_atoms is None else self.max_atoms
        z = torch.as_tensor(mol.atomic_numbers, dtype=torch.long)
        if int(z.max()) >= _ENCODER.numel() or bool((_ENCODER[z] < 0).any()):
            raise ValueError(f"{mol.name}: atomic numbers {sorted(set(z.tolist()))} outside H, C, N, O, F")
        pos = torch.as_tensor(mol.positions, dtype=torch.float64)
        if self.center:
            pos = pos - pos.mean(dim=0, keepdim=True)  # float64 first: QM9 coordinates carry 10 digits
        positions = torch.zeros(size, 3, dtype=self.dtype)
        positions[:n] = pos.to(self.dtype)
        one_hot = torch.zeros(size, len(ATOM_DECODER), dtype=self.dtype)
        one_hot[torch.arange(n), _ENCODER[z]] = 1.0
        charges = torch.zeros(size, 1, dtype=self.dtype)
        charges[:n, 0] = z.to(self.dtype)
        node_mask = torch.zeros(size, dtype=torch.bool)
        node_mask[:n] = True
        return {
            "positions": positions,
            "one_hot": one_hot,
            "charges": charges,
            "node_mask": node_mask,
            "index": torch.tensor(mol.index, dtype=torch.long),
        }


def collate_qm9(items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack items padded (or trimmed of extra padding) to the batch's largest real atom count ``N``.

    Returns ``positions`` ``[B, N, 3]``, ``one_hot`` ``[B, N, 5]``, ``charges`` ``[B, N, 1]``,
    ``node_mask`` ``[B, N]`` bool, ``index`` ``[B]``. Real atoms come first in every item, so trimming
    to ``N`` never drops one.
    """
    if not items:
        raise ValueError("collate_qm9 needs at least one item")
    n = max(int(it["node_mask"].sum()) for it in items)
    out: dict[str, Tensor] = {}
    for key in ("positions", "one_hot", "charges", "node_mask"):
        rows = []
        for it in items:
            t = it[key][:n]
            if t.shape[0] < n:
                pad = t.new_zeros((n - t.shape[0],) + tuple(t.shape[1:]))
                t = torch.cat([t, pad], dim=0)
            rows.append(t)
        out[key] = torch.stack(rows)
    out["index"] = torch.stack([it["index"] for it in items])
    return out


class QM9FileDataset(QM9Dataset):
    """One split of the real QM9 (``dsgdb9nsd.xyz.tar.bz2`` or its directory), for configs.

    Args:
        path: the archive or directory.
        exclude: ``uncharacterized.txt`` (EDM excludes these 3,054); None keeps all (not EDM's split).
        split: ``train``, ``valid``, ``test`` or ``all``.
        seed: split permutation seed (EDM: 0).
        center, max_atoms, dtype: as for :class:`QM9Dataset`.
    """

    def __init__(self, path: str, exclude: str | None = None, split: str = "train", seed: int = 0,
                 center: bool = True, max_atoms: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        if not Path(path).exists():
            raise ConfigError("path", path, "an existing dsgdb9nsd.xyz.tar.bz2 archive or directory of .xyz files")
        seed = check_int("seed", seed)
        super().__init__(load_qm9(path, exclude=exclude, split=split, seed=seed), center=center,
                         max_atoms=max_atoms, dtype=dtype)
        self.split = split
