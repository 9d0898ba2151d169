"""RDKit validity, uniqueness and novelty of generated molecules (EDM/ELIGN definitions, spec §2.4).

- validity   = #valid / #total            (valid = SMILES is not ``None``)
- uniqueness = #unique valid / #valid     (distinct SMILES strings)
- novelty    = #unique not in reference / #unique   (``None`` without a reference)

Empty denominators give 0.0 (as ELIGN's ``compute_rdkit_metrics``), so a batch with no valid molecule
reports validity 0, uniqueness 0 and novelty 0 rather than NaN.

The reference must be in the same SMILES form as the generated SMILES (see
:mod:`elign.chem.rdkit_mol`); :func:`load_reference_smiles` re-canonicalises every line with the
installed RDKit so that a file written by another RDKit version still compares correctly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from rdkit import Chem, rdBase

__all__ = ["load_reference_smiles", "validity_uniqueness_novelty"]


def validity_uniqueness_novelty(
    smiles: Sequence[str | None], reference: set[str] | frozenset[str] | None = None
) -> dict[str, Any]:
    """Validity, uniqueness and novelty of a list of SMILES (``None`` = invalid molecule).

    Args:
        smiles: one entry per generated molecule, ``None`` where RDKit sanitisation failed.
        reference: training-set SMILES (same canonical form) or ``None`` to skip novelty.

    Returns:
        ``{"num_total", "num_valid", "num_unique", "num_novel", "validity", "uniqueness", "novelty"}``;
        ``num_novel`` and ``novelty`` are ``None`` when ``reference`` is ``None``.
    """
    valid = [s for s in smiles if s is not None]
    unique = set(valid)
    num_total, num_valid, num_unique = len(smiles), len(valid), len(unique)
    out: dict[str, Any] = {
        "num_total": num_total,
        "num_valid": num_valid,
        "num_unique": num_unique,
        "validity": num_valid / num_total if num_total else 0.0,
        "uniqueness": num_unique / num_valid if num_valid else 0.0,
        "num_novel": None,
        "novelty": None,
    }
    if reference is not None:
        num_novel = sum(1 for s in unique if s not in reference)
        out["num_novel"] = num_novel
        out["novelty"] = num_novel / num_unique if num_unique else 0.0
    return out


def _canonical_lines(lines: Iterable[str], source: str, canonicalize: bool, isomeric: bool) -> frozenset[str]:
    out: set[str] = set()
    # One BlockLogs for the whole file: a bad line would otherwise print RDKit's parse error as well.
    with rdBase.BlockLogs():
        for lineno, raw in enumerate(lines, start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            token = text.split()[0]  # tolerate "SMILES name" files
            mol = Chem.MolFromSmiles(token)
            if mol is None:
                raise ValueError(f"{source}:{lineno}: cannot parse SMILES {token!r}")
            out.add(Chem.MolToSmiles(mol, isomericSmiles=isomeric) if canonicalize else token)
    return frozenset(out)


def load_reference_smiles(
    path: str | os.PathLike[str], canonicalize: bool = True, isomeric: bool = True
) -> frozenset[str]:
    """Read a SMILES-per-line file (e.g. ``../shared/data/qm9_smiles.txt``) as a novelty reference.

    Blank lines and lines starting with ``#`` are skipped; only the first whitespace-separated token of
    a line is used. Every SMILES is parsed (and by default re-canonicalised) with RDKit; a line RDKit
    cannot parse raises ``ValueError("<path>:<line>: cannot parse SMILES ...")``.

    Args:
        path: text file, one SMILES per line.
        canonicalize: rewrite each SMILES in the installed RDKit's canonical form (~8 s for QM9's
            108k lines on one core; parsing for validation is needed anyway).
        isomeric: keep stereo when canonicalising; use False together with
            ``to_smiles(..., stereo="none")``.

    Returns:
        Frozen set of canonical SMILES.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as fh:
        return _canonical_lines(fh, path, canonicalize, isomeric)
