"""Reference conformers of a molecule, looked up by canonical SMILES in a conformer data folder.

The folder is the layout of :func:`molgen_grpo.conformers.write_dataset` (and of 3DMolGen's GEOM
preprocessing): ``smiles_to_pickle.json`` maps a canonical SMILES to a pickle holding a list of RDKit
molecules, read through the restricted unpickler. Molecules without a pickle (the shipped data pickles
only its valid and test splits) can take their references from JSONL splits instead: every line of a
molecule is one conformer of its ensemble, decoded from its enriched string. Ensembles are cut to the first ``max_references``
and kept in a small least-recently-used cache, since a training run prompts the same molecules again.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from rdkit import Chem

from elign.engine.errors import DataFormatError, check_int
from molgen_grpo.conformers import MAPPING_NAME
from molgen_grpo.pickles import load_pickle
from molgen_grpo.text import DecodeError, decode
from molgen_grpo.tokenizer import resolve_path

_PROMPT_SMILES = re.compile(r"\[SMILES\](.*?)\[/SMILES\]", re.DOTALL)


def split_smiles(data_dir: str, split: str, max_molecules: int | None = None) -> dict[str, int]:
    """The distinct canonical SMILES of ``<data_dir>/<split>.jsonl`` in file order, each with the line
    it first appears on; the first ``max_molecules`` (None = all).

    Raises:
        DataFormatError: a missing file or a line that is not a JSON object with ``canonical_smiles``
            (names the file and line).
    """
    root = Path(resolve_path(str(data_dir)))
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise DataFormatError(str(path), None, f"no such file: {root} is not a conformer data folder")
    out: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if max_molecules is not None and len(out) >= max_molecules:
                break
            if not line.strip():
                continue
            try:
                out.setdefault(str(json.loads(line)["canonical_smiles"]), line_no)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataFormatError(str(path), line_no, "not a JSON object with canonical_smiles") from None
    return out


def prompt_smiles(prompt: str) -> str | None:
    """The SMILES between ``[SMILES]`` and ``[/SMILES]`` of a prompt, or None without such a block."""
    match = _PROMPT_SMILES.search(prompt)
    return match.group(1).strip() if match else None


class ReferenceStore:
    """Canonical SMILES -> its reference conformers (each one conformer; heavy atoms only by default)."""

    def __init__(self, data_dir: str, max_references: int | None = 30, cache_size: int = 256,
                 jsonl_splits: Sequence[str] = (), heavy_atoms_only: bool = True) -> None:
        """
        Args:
            data_dir: conformer data folder (local path or ``package:`` path).
            max_references: the first this many conformers of an ensemble (``M``); None = all.
            cache_size: molecules whose ensembles stay in memory.
            jsonl_splits: splits (e.g. ``["train"]``) whose JSONL lines are the references of molecules
                that have no pickle, in file order.
            heavy_atoms_only: remove hydrogens (the rewards align heavy atoms); False keeps the
                references as stored (evaluation draws them).
        Raises:
            DataFormatError: no mapping file, or one that is not a JSON object; a JSONL split that
                is missing or has a bad line (names the file and line).
        """
        self.root = Path(resolve_path(str(data_dir)))
        self.max_references = check_int("max_references", max_references, 1, allow_none=True, none_means="all")
        self.cache_size = check_int("reference_cache_size", cache_size, 1)
        self.heavy_atoms_only = bool(heavy_atoms_only)
        mapping_file = self.root / MAPPING_NAME
        if not mapping_file.is_file():
            raise DataFormatError(str(mapping_file), None, f"no such file: {self.root} is not a conformer data folder")
        try:
            mapping = json.loads(mapping_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataFormatError(str(mapping_file), exc.lineno, f"not JSON ({exc.msg})") from None
        if not isinstance(mapping, dict):
            raise DataFormatError(str(mapping_file), None, "not a JSON object of SMILES -> pickle path")
        self.mapping: dict[str, str] = mapping
        self.lines: dict[str, list[str]] = {}
        for split in jsonl_splits:
            self._index(self.root / f"{split}.jsonl")
        self._cache: OrderedDict[str, tuple[Chem.Mol, ...]] = OrderedDict()

    def _index(self, path: Path) -> None:
        if not path.is_file():
            raise DataFormatError(str(path), None, "no such file (a split named in jsonl_splits)")
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key, text = str(record["canonical_smiles"]), str(record["embedded_smiles"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataFormatError(str(path), line_no, "not a JSON object with canonical_smiles and "
                                                              "embedded_smiles") from None
                if key not in self.mapping:
                    self.lines.setdefault(key, []).append(text)

    def __contains__(self, smiles: str) -> bool:
        return smiles in self.mapping or smiles in self.lines

    def get(self, smiles: str) -> tuple[Chem.Mol, ...] | None:
        """The molecule's references, or None when the mapping has no entry for ``smiles``.

        Raises:
            DataFormatError: the entry's pickle is missing or not a non-empty list of RDKit molecules
                with conformers (names the file).
        """
        if smiles in self._cache:
            self._cache.move_to_end(smiles)
            return self._cache[smiles]
        if smiles in self.mapping:
            path = self.root / self.mapping[smiles]
            refs = load_pickle(path)
            if not isinstance(refs, list) or not refs or not all(isinstance(m, Chem.Mol) for m in refs):
                raise DataFormatError(str(path), None, "not a non-empty list of RDKit molecules")
            if any(m.GetNumConformers() == 0 for m in refs):
                raise DataFormatError(str(path), None, "a reference molecule without a conformer")
        elif smiles in self.lines:
            try:
                refs = [decode(text) for text in self.lines[smiles][: self.max_references]]
            except DecodeError as err:
                raise DataFormatError(str(self.root), None, f"a JSONL conformer of {smiles} does not decode: {err}") from None
        else:
            return None
        kept = tuple(Chem.RemoveHs(m) if self.heavy_atoms_only else m for m in refs[: self.max_references])
        self._cache[smiles] = kept
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return kept
