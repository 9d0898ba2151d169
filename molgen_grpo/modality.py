"""Which sequence a completion holds and in which modality: explicit tags, dataset metadata, a detector.

lobster's ``rl_training`` reads only ``<protein>`` while its prompts ask for ``<amino_acid>``, and its detector
(``_detect_modality``) upper-cases the text and tests DNA letters before protein letters before SMILES, so
``CCC`` is DNA, ``CCN`` a protein and ``c1ccccc1`` is validated as ``C1CCCCC1``. Here:

1. **tags** (:func:`find_tagged`): the earliest of ``<smiles>``, ``<protein>``, ``<amino_acid>`` (the same
   modality as ``<protein>``), ``<dna>`` with its own closing tag; its stripped content is the sequence. An empty
   tag is a failure (``empty_tag``), never a fallback.
2. **metadata**: the prompt's modality column (a dataset that knows what it asked for).
3. **detector** (:func:`detect_modality`): lobster's precedence, except that text RDKit parses as a molecule
   (in its own case) is SMILES before the letter rules run: ``CCC`` and ``CCN`` are molecules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

MODALITIES = ("smiles", "protein", "dna")
#: Tag name -> modality. ``amino_acid`` is what lobster's prompts ask for; ``protein`` what its reward reads.
TAGS = {"smiles": "smiles", "protein": "protein", "amino_acid": "protein", "dna": "dna"}
SOURCES = ("tags", "metadata", "detect")
MIN_LENGTH = 3  # lobster's detector refuses shorter text ("Sequence too short")

_OPEN = re.compile(r"<(" + "|".join(TAGS) + r")>", re.IGNORECASE)
_DNA = re.compile(r"^[ATGC]+$", re.IGNORECASE)
_PROTEIN = re.compile(r"^[ACDEFGHIKLMNPQRSTVWY]+$", re.IGNORECASE)
_SMILES_MARKS = re.compile(r"[()\[\]=#@]")
_SMILES_CHARS = re.compile(r"^[A-Za-z0-9()\[\]=#@+\-\\/%.:*]+$")


@dataclass(frozen=True)
class Parsed:
    """What one completion holds: the sequence and its modality, or why it cannot be scored.

    Attributes:
        sequence: the text to score ("" when it failed).
        modality: one of :data:`MODALITIES`, or None when it failed.
        source: the source that decided (``tags``, ``metadata``, ``detect``), or None.
        reason: None, or why it failed: ``no_tag``, ``empty_tag``, ``too_short``, ``invalid_smiles``,
            ``unknown_modality``.
    """

    sequence: str
    modality: str | None
    source: str | None = None
    reason: str | None = None


def find_tagged(text: str) -> tuple[str, str] | None:
    """``(modality, stripped content)`` of the earliest complete tag pair in ``text``, else None.

    An opening tag without its own closing tag does not count; the next opening tag is tried.
    """
    for match in _OPEN.finditer(text):
        name = match.group(1).lower()
        close = re.compile(rf"</{name}>", re.IGNORECASE).search(text, match.end())
        if close is not None:
            return TAGS[name], text[match.end():close.start()].strip()
    return None


def parses_as_smiles(text: str) -> bool:
    """RDKit reads ``text`` (as written: lowercase aromatic atoms stay aromatic) as a non-empty molecule."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    try:
        mol = Chem.MolFromSmiles(text)
    finally:
        RDLogger.EnableLog("rdApp.*")
    return mol is not None and mol.GetNumAtoms() > 0


def detect_modality(text: str) -> tuple[str | None, str | None]:
    """``(modality, None)`` or ``(None, reason)`` for untagged text (module docstring, rule 3).

    Order: shorter than :data:`MIN_LENGTH` -> ``too_short``; RDKit-valid SMILES -> smiles; only A/C/G/T ->
    dna; only the 20 amino-acid letters -> protein; SMILES characters with one of ``()[]=#@`` that RDKit
    refuses -> ``invalid_smiles``; anything else -> ``unknown_modality``.
    """
    text = text.strip()
    if len(text) < MIN_LENGTH:
        return None, "too_short"
    if _SMILES_CHARS.match(text) and parses_as_smiles(text):
        return "smiles", None
    if _DNA.match(text):
        return "dna", None
    if _PROTEIN.match(text):
        return "protein", None
    if _SMILES_CHARS.match(text) and _SMILES_MARKS.search(text):
        return None, "invalid_smiles"
    return None, "unknown_modality"


def check_sequence(sequence: str, modality: str) -> str | None:
    """None when ``sequence`` is valid for ``modality``, else the reason: ``invalid_smiles`` (RDKit refuses it),
    ``invalid_protein`` (a letter outside the 20 amino acids), ``invalid_dna`` (outside A/C/G/T); case-insensitive
    for the letter rules, as the detector."""
    if modality == "smiles":
        return None if parses_as_smiles(sequence) else "invalid_smiles"
    if modality == "protein":
        return None if _PROTEIN.match(sequence) else "invalid_protein"
    if modality == "dna":
        return None if _DNA.match(sequence) else "invalid_dna"
    raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")


def parse_completion(text: str, metadata: str | None = None, sources: Sequence[str] = SOURCES) -> Parsed:
    """The sequence and modality of one completion, trying ``sources`` in order (module docstring).

    Args:
        text: the completion.
        metadata: the prompt's modality (one of :data:`MODALITIES`), or None.
        sources: the order of :data:`SOURCES` to try; with ``tags`` alone an untagged completion fails
            (``no_tag``, lobster v2's penalty); after ``tags`` the other sources score the whole completion.
    """
    tried_tags = False
    for source in sources:
        if source == "tags":
            tried_tags = True
            tagged = find_tagged(text)
            if tagged is not None:
                modality, sequence = tagged
                if not sequence:
                    return Parsed("", None, "tags", "empty_tag")
                return Parsed(sequence, modality, "tags")
        elif source == "metadata":
            if metadata is not None:
                sequence = text.strip()
                if not sequence:
                    return Parsed("", None, "metadata", "too_short")
                return Parsed(sequence, metadata, "metadata")
        elif source == "detect":
            modality, reason = detect_modality(text)
            return Parsed(text.strip() if modality else "", modality, "detect", reason)
        else:
            raise ValueError(f"unknown modality source {source!r}; expected one of {SOURCES}")
    return Parsed("", None, None, "no_tag" if tried_tags else "unknown_modality")
