"""Reader of Boltz's processed RCSB layout (the Boltz-1 pre-processed training data) into :class:`Target`s.

The layout mirrors what boltz's own training data module reads (``boltz/data/module/training.py``:
``DatasetConfig(target_dir, msa_dir, manifest_path)``, ``load_input``)::

    <root>/targets/manifest.json         a JSON list of Record dicts, or {"records": [...]} (Manifest.load)
    <root>/targets/records/{id}.json     one Record each (only read when the manifest is absent)
    <root>/targets/structures/{id}.npz   a v1 ``Structure`` (numpy structured arrays)
    <root>/msa/{msa_id}.npz              an ``MSA`` per chain; msa_id "" or -1 = query-only
    <root>/symmetry.pkl                  optional: CCD code -> RDKit Mol (see :func:`load_symmetry`)

The released tars are v1, but boltz's v2 tokenizer and featurizer (what :func:`boltz_ft.data.featurize`
runs) need a ``StructureV2``, so :func:`structure_v1_to_v2` converts with numpy only. v2 takes element
(for ``ref_element``), charge, chirality and the reference conformer from the CCD molecules at
featurisation time, so the v1 ``charge``/``conformer``/``chirality`` columns are not carried; the v1
element is kept in ``AtomV2.element`` (the writers read it). Chains are dropped (and the rest renumbered,
as ``remove_invalid_chains`` does, because the v2 featurizer indexes ``chains`` by ``asym_id``) when the
structure's ``mask`` or the record's ``valid`` flag says so, or when a residue or atom name has no CCD
counterpart in ``mols`` (the featurizer would raise a KeyError deep inside); :attr:`RCSBTargets.dropped`
says which and why.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from elign.engine.errors import DataFormatError
from boltz_ft.ccd import CCDMolecules
from boltz_ft.data import Target

__all__ = ["RCSBTargets", "RefusedGlobal", "load_symmetry", "load_v1_structure", "structure_v1_to_v2",
           "symmetry_permutations"]

log = logging.getLogger(__name__)

SYMMETRY_GLOBALS = frozenset({("rdkit.Chem.rdchem", "Mol"), ("_codecs", "encode")})
"""What a pickled ``dict[str, Mol]`` needs: the Mol class (rebuilt from its binary by REDUCE, properties
by BUILD) and, in protocols 0-2, ``_codecs.encode`` (how those protocols spell ``bytes``). Nothing else."""

_RECORD_ERRORS = (LookupError, TypeError, ValueError, AttributeError)  # mashumaro's errors derive from these


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside the allowed set (nothing was called)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``allowed``: a refused one raises before anything is called."""

    def __init__(self, file: Any, allowed: frozenset[tuple[str, str]], source: str) -> None:
        super().__init__(file)
        self.allowed, self.source = allowed, source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        raise RefusedGlobal(f"{self.source}: global {module}.{name} is not allowed "
                            f"(allowed: {sorted('.'.join(g) for g in self.allowed)})")


def _restricted_loads(data: bytes, allowed: frozenset[tuple[str, str]], source: str) -> Any:
    return _RestrictedUnpickler(io.BytesIO(data), allowed, source).load()


def load_symmetry(path: str | Path) -> dict[str, Any]:
    """``symmetry.pkl`` (CCD code -> RDKit Mol, or None where boltz's script failed) without trusting it.

    A plain ``pickle.load`` (what boltz does) runs whatever a downloaded file asks for; this unpickler
    resolves only :data:`SYMMETRY_GLOBALS`.
    Raises:
        DataFormatError: missing file, not a pickle, or not a dict.
        RefusedGlobal: (a ``pickle.UnpicklingError``) the file names any other global (the message names
            it and the file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(str(path), None, "no symmetry file")
    try:
        data = _restricted_loads(path.read_bytes(), SYMMETRY_GLOBALS, str(path))
    except RefusedGlobal:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError) as exc:  # RuntimeError: RDKit refusing a corrupt Mol binary
        raise DataFormatError(str(path), None, f"not a readable pickle: {exc}") from exc
    if not isinstance(data, dict):
        raise DataFormatError(str(path), None, f"expected a dict of CCD code -> Mol, got {type(data).__name__}")
    return data


def symmetry_permutations(mols: dict[str, Any]) -> dict[str, tuple[list[list[int]], list[tuple[int, ...]]]]:
    """``{code: (atom permutations, 4-int atom names)}``, as boltz's ``get_symmetries`` builds it.

    The permutations are themselves a hex-encoded pickle in each Mol's ``symmetries`` property (lists of
    ints), so they are read with no globals allowed at all. Like upstream, molecules without them are skipped.
    """
    out = {}
    for code, mol in mols.items():
        if mol is None or not mol.HasProp("symmetries"):
            continue
        perms = _restricted_loads(bytes.fromhex(mol.GetProp("symmetries")), frozenset(), f"symmetries of {code}")
        names = [_name_codes(a.GetProp("name")) for a in mol.GetAtoms()]
        out[code] = (perms, names)
    return out


def _name_codes(name: str) -> tuple[int, ...]:
    codes = [ord(c) - 32 for c in name.strip()]
    return tuple(codes + [0] * (4 - len(codes)))


def _decode_names(codes: np.ndarray) -> np.ndarray:
    """v1 atom names (4 int8 codes, ``ord(c) - 32``, 0-padded) -> v2 ``<U4`` strings, vectorised."""
    codes = np.asarray(codes, dtype=np.int16).reshape(-1, 4)
    chars = np.where(codes != 0, codes + 32, 0).astype(np.uint8)
    return np.ascontiguousarray(chars).view("S4")[:, 0].astype("U4")


def _with_cyclic_period(chains: np.ndarray) -> np.ndarray:
    """Older v1 files lack ``cyclic_period``: add it as 0, as upstream's v1 ``load_input`` does."""
    if "cyclic_period" in chains.dtype.names:
        return chains
    out = np.empty(chains.shape, dtype=chains.dtype.descr + [("cyclic_period", "i4")])
    for name in chains.dtype.names:
        out[name] = chains[name]
    out["cyclic_period"] = 0
    return out


def load_v1_structure(path: str | Path, record_id: str | None = None) -> Any:
    """A v1 ``Structure`` npz, exactly as upstream's training ``load_input`` reads it (no pickles allowed).

    Raises:
        DataFormatError: the file is missing, not an npz, or lacks one of the v1 tables (names file and record).
    """
    from boltz.data.types import Connection, Structure

    tables = _load_npz(Path(path), ("atoms", "bonds", "residues", "chains", "connections", "interfaces", "mask"),
                       "structure", record_id)
    if not {"element", "conformer"} <= set(tables["atoms"].dtype.names or ()):
        raise DataFormatError(str(path), None, f"atoms are not v1 (no element/conformer columns) (record {record_id})")
    tables["chains"] = _with_cyclic_period(tables["chains"])
    tables["connections"] = tables["connections"].astype(Connection)
    return Structure(**tables)


def _load_npz(path: Path, keys: tuple[str, ...], what: str, record_id: str | None) -> dict[str, np.ndarray]:
    """The named tables of an npz (``allow_pickle`` off, as boltz's training loaders read them)."""
    where = f" (record {record_id})" if record_id else ""
    if not path.is_file():
        raise DataFormatError(str(path), None, f"no {what} file{where}")
    try:
        with np.load(path) as data:
            return {k: data[k] for k in keys}
    except KeyError as exc:
        raise DataFormatError(str(path), None, f"not a {what} npz: missing table {exc}{where}") from exc
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataFormatError(str(path), None, f"not a readable npz: {exc}{where}") from exc


def structure_v1_to_v2(structure: Any, keep: np.ndarray | None = None) -> tuple[Any, dict[int, int]]:
    """Convert a v1 ``Structure`` to ``StructureV2``, keeping only the chains where ``keep`` is True.

    Kept chains are renumbered 0.. (``asym_id`` = position; ``sym_id`` recounted per entity, as in
    ``remove_invalid_chains``). Atoms become (name, element, coords, is_present, bfactor=0, plddt=1: v1 has
    no B-factors, and boltz's parsers set plddt 1 for experimental data); one ensemble member whose
    ``coords`` table is the atoms' coordinates. v1 intra-residue ``bonds`` and inter-residue
    ``connections`` both become ``BondV2`` rows (connections typed COVALENT, as boltz's v2 mmCIF parser
    does); their chain and residue columns are re-derived from the atom indices. Interfaces between kept
    chains are kept.

    Returns:
        (the StructureV2, {old chain index: new chain index}).
    """
    from boltz.data import const
    from boltz.data.types import AtomV2, BondV2, Chain, Coords, Ensemble, Interface, Residue, StructureV2

    chains_v1 = _with_cyclic_period(structure.chains)
    kept = np.flatnonzero(np.asarray(structure.mask if keep is None else keep, dtype=bool))
    atom_map = np.full(len(structure.atoms), -1, dtype=np.int64)
    chains = np.zeros(len(kept), dtype=Chain)
    residues, atom_parts, entity_count = [], [], {}
    n_atoms = n_res = 0
    for new, old in enumerate(kept):
        src = chains_v1[old]
        a0, an, r0, rn = (int(src[k]) for k in ("atom_idx", "atom_num", "res_idx", "res_num"))
        sym = entity_count.get(int(src["entity_id"]), 0)
        entity_count[int(src["entity_id"])] = sym + 1
        chains[new] = tuple(src[n] for n in chains.dtype.names)
        for column, value in (("asym_id", new), ("sym_id", sym), ("atom_idx", n_atoms), ("res_idx", n_res)):
            chains[column][new] = value
        res = structure.residues[r0:r0 + rn].astype(Residue)
        for column in ("atom_idx", "atom_center", "atom_disto"):
            res[column] += n_atoms - a0
        residues.append(res)
        atom_parts.append(structure.atoms[a0:a0 + an])
        atom_map[a0:a0 + an] = np.arange(n_atoms, n_atoms + an)
        n_atoms, n_res = n_atoms + an, n_res + rn
    v1_atoms = np.concatenate(atom_parts) if atom_parts else structure.atoms[:0]
    atoms = np.zeros(len(v1_atoms), dtype=AtomV2)
    atoms["name"] = _decode_names(v1_atoms["name"])
    for column in ("element", "coords", "is_present"):
        atoms[column] = v1_atoms[column]
    atoms["plddt"] = 1.0
    residues = np.concatenate(residues) if residues else np.zeros(0, dtype=Residue)
    chain_map = {int(old): new for new, old in enumerate(kept)}

    # Bonds and connections: both ends kept; owner residue and chain re-derived from the (new) atom index.
    atom_res = np.repeat(np.arange(len(residues)), residues["atom_num"])
    res_chain = np.repeat(np.arange(len(chains)), chains["res_num"])
    ends = [atom_map[np.concatenate([structure.bonds[k], structure.connections[k]]).astype(np.int64)]
            for k in ("atom_1", "atom_2")]
    types = np.concatenate([structure.bonds["type"], np.full(len(structure.connections),
                                                             const.bond_type_ids["COVALENT"])])
    ok = (ends[0] >= 0) & (ends[1] >= 0)
    bonds = np.zeros(int(ok.sum()), dtype=BondV2)
    bonds["atom_1"], bonds["atom_2"], bonds["type"] = ends[0][ok], ends[1][ok], types[ok]
    bonds["res_1"], bonds["res_2"] = atom_res[bonds["atom_1"]], atom_res[bonds["atom_2"]]
    bonds["chain_1"], bonds["chain_2"] = res_chain[bonds["res_1"]], res_chain[bonds["res_2"]]
    interfaces = [(chain_map[int(i["chain_1"])], chain_map[int(i["chain_2"])]) for i in structure.interfaces
                  if int(i["chain_1"]) in chain_map and int(i["chain_2"]) in chain_map]
    coords = np.zeros(len(atoms), dtype=Coords)
    coords["coords"] = atoms["coords"]
    v2 = StructureV2(atoms=atoms, bonds=bonds, residues=residues, chains=chains,
                     interfaces=np.array(interfaces, dtype=Interface), mask=np.ones(len(chains), dtype=bool),
                     coords=coords, ensemble=np.array([(0, len(atoms))], dtype=Ensemble))
    return v2, chain_map


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataFormatError(str(path), None, f"no {what} file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(str(path), exc.lineno, f"bad JSON in the {what}: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(str(path), None, f"unreadable {what}: {exc}") from exc


def _record(data: Any, path: Path, index: int | None = None) -> Any:
    from boltz.data.types import Record

    label = data.get("id") if isinstance(data, dict) else None
    label = f"record {label!r}" if label else f"record #{index}" if index is not None else "record"
    try:
        return Record.from_dict(data)
    except _RECORD_ERRORS as exc:
        raise DataFormatError(str(path), None, f"{label} is not a boltz Record: {exc}") from exc


class RCSBTargets:
    """The targets of one processed-RCSB dataset directory, loaded one at a time as boltz ``Input``s.

    Args:
        root: the dataset directory holding ``targets/``, ``msa/`` and optionally ``symmetry.pkl``.
        ids: only these record ids, in this order (default: the manifest's order).
        max_targets: keep the first this many (after ``ids``).
        mols: CCD molecules used to check residue and atom names (and to pass on to ``featurize``).
        target_dir, msa_dir, manifest_path: overrides, as in boltz's ``DatasetConfig``.
    Raises:
        DataFormatError: no manifest (nor ``records/``), bad JSON, a bad record, or an unknown id.
    """

    def __init__(self, root: str | Path, ids: Iterable[str] | None = None, max_targets: int | None = None,
                 mols: CCDMolecules | None = None, *, target_dir: str | Path | None = None,
                 msa_dir: str | Path | None = None, manifest_path: str | Path | None = None) -> None:
        self.root = Path(root)
        self.target_dir = Path(target_dir) if target_dir is not None else self.root / "targets"
        self.msa_dir = Path(msa_dir) if msa_dir is not None else self.root / "msa"
        self.manifest_path = Path(manifest_path) if manifest_path is not None else self.target_dir / "manifest.json"
        self.symmetry_path = self.root / "symmetry.pkl"
        self.mols = CCDMolecules() if mols is None else mols
        self.dropped: dict[str, dict[str, str]] = {}
        """Record id -> {chain name: why it was dropped}, filled by :meth:`load`."""
        self._atom_names: dict[str, frozenset[str] | None] = {}
        records = self._read_records()
        self.records = {r.id: r for r in records}
        if ids is None:
            chosen = [r.id for r in records]
        else:
            chosen = list(ids)
            unknown = [i for i in chosen if i not in self.records]
            if unknown:
                raise DataFormatError(str(self.manifest_path), None, f"record ids {unknown} are not in the manifest")
        self.ids: list[str] = chosen if max_targets is None else chosen[:max_targets]

    def _read_records(self) -> list[Any]:
        """Manifest first (what upstream training reads); without one, every ``records/*.json``."""
        records_dir = self.target_dir / "records"
        if not self.manifest_path.is_file() and records_dir.is_dir():
            return [_record(_read_json(p, "record"), p) for p in sorted(records_dir.glob("*.json"))]
        data = _read_json(self.manifest_path, "manifest")
        if isinstance(data, dict):
            if not isinstance(data.get("records"), list):
                raise DataFormatError(str(self.manifest_path), None, 'a dict manifest needs a "records" list')
            data = data["records"]
        if not isinstance(data, list):
            raise DataFormatError(str(self.manifest_path), None,
                                  f"expected a list of records or {{'records': [...]}}, got {type(data).__name__}")
        return [_record(r, self.manifest_path, i) for i, r in enumerate(data)]

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Target]:
        return (self.load(i) for i in self.ids)

    def symmetries(self) -> dict[str, Any]:
        """``symmetry.pkl`` through :func:`load_symmetry`; {} when the dataset has none (protein-only work)."""
        return load_symmetry(self.symmetry_path) if self.symmetry_path.is_file() else {}

    def _ccd_atom_names(self, code: str) -> frozenset[str] | None:
        if code not in self._atom_names:
            mol = self.mols.get(code)
            self._atom_names[code] = None if mol is None else frozenset(a.GetProp("name") for a in mol.GetAtoms())
        return self._atom_names[code]

    def _unconvertible(self, structure: Any, chain: np.ndarray) -> str | None:
        """Why the v2 featurizer could not take this chain (a residue or atom name unknown to the CCD)."""
        r0, rn = int(chain["res_idx"]), int(chain["res_num"])
        for res in structure.residues[r0:r0 + rn]:
            known = self._ccd_atom_names(str(res["name"]))
            if known is None:
                return f"residue {res['name']} is not in the CCD"
            names = _decode_names(structure.atoms[res["atom_idx"]:res["atom_idx"] + res["atom_num"]]["name"])
            missing = sorted(set(names.tolist()) - known)
            if missing:
                return f"residue {res['name']} {int(res['res_idx'])}: atoms {missing} are not in its CCD entry"
        return None

    def load(self, target_id: str) -> Target:
        """One target as ``Target(id, Input(StructureV2, {asym_id: MSA}, Record), sequences, "rcsb")``.

        Raises:
            KeyError: ``target_id`` is not in the manifest.
            DataFormatError: a missing or unreadable structure or MSA file (names it and the record),
                or no chain left to keep.
        """
        from boltz.data import const
        from boltz.data.types import MSA, ChainInfo, Input

        if target_id not in self.records:
            raise KeyError(f"record {target_id!r} is not in {self.manifest_path}")
        record = self.records[target_id]
        path = self.target_dir / "structures" / f"{target_id}.npz"
        v1 = load_v1_structure(path, target_id)
        info = {int(c.chain_id): c for c in record.chains}
        keep = np.asarray(v1.mask, dtype=bool).copy()
        dropped = {}
        for i, chain in enumerate(v1.chains):
            chain_info = info.get(int(chain["asym_id"]))
            reason = ("structure mask" if not keep[i] else
                      "record valid=False" if chain_info is not None and not chain_info.valid else
                      self._unconvertible(v1, chain))
            if reason is not None:
                keep[i] = False
                dropped[str(chain["name"])] = reason
        self.dropped[target_id] = dropped
        if dropped:
            log.info("%s: dropped chains %s", target_id, dropped)
        if not keep.any():
            raise DataFormatError(str(path), None, f"record {target_id}: no chain left to keep ({dropped})")
        structure, chain_map = structure_v1_to_v2(v1, keep)

        # The record names chains by asym_id; the new tables by position, so remap both MSAs and record.
        asym_map = {int(v1.chains[old]["asym_id"]): new for old, new in chain_map.items()}
        msas, chains = {}, []
        for asym_id, new in asym_map.items():
            chain = structure.chains[new]
            chain_info = info.get(asym_id) or ChainInfo(
                chain_id=new, chain_name=str(chain["name"]), mol_type=int(chain["mol_type"]), cluster_id=-1,
                msa_id=-1, num_residues=int(chain["res_num"]), entity_id=int(chain["entity_id"]))
            if chain_info.msa_id not in (-1, "", None):
                # MSA(**np.load(path)) as upstream's training loader: MSA.load would allow pickles in the npz.
                path = self.msa_dir / f"{chain_info.msa_id}.npz"
                msas[new] = MSA(**_load_npz(path, ("sequences", "deletions", "residues"), "MSA", target_id))
            chains.append(dataclasses.replace(chain_info, chain_id=new))
        interfaces = [dataclasses.replace(i, chain_1=asym_map[i.chain_1], chain_2=asym_map[i.chain_2])
                      for i in record.interfaces if i.chain_1 in asym_map and i.chain_2 in asym_map]
        record = dataclasses.replace(record, chains=chains, interfaces=interfaces)

        sequences = {str(c["name"]): "".join(const.prot_token_to_letter.get(str(n), "X") for n in
                                             structure.residues[c["res_idx"]:c["res_idx"] + c["res_num"]]["name"])
                     for c in structure.chains if int(c["mol_type"]) == const.chain_type_ids["PROTEIN"]}
        return Target(id=target_id, input=Input(structure, msas, record=record), sequences=sequences, source="rcsb")
