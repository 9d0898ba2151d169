"""3D molecules as text: 3DMolGen's "enriched SMILES" (``encode_cartesian_v2`` format, spec §1.2).

An enriched string is the canonical isomeric SMILES of the hydrogen-free molecule with every atom
token bracketed and followed by its coordinates::

    [C]<1.2345,-1.2345,0.0000>[C]<0.0000,0.0000,0.0000>(=[O]<...>)[O]<...>

- Atoms come in RDKit's SMILES output order, so the i-th atom token is atom i of the decoded
  molecule. Bracket atoms RDKit writes (``[C@@H]``, ``[nH]``, ``[NH3+]``, ``[13CH3]``, ``[2H]``) are
  copied; bare atoms (``C``, ``c``, ``Cl``) are wrapped (``[C]``, ``[c]``, ``[Cl]``) so that every
  atom has one token shape. The decoder un-wraps them again, because RDKit reads ``[C]`` as a carbon
  with *no* hydrogens (a radical), not as methane's carbon.
- That makes RDKit's own ``[C]``, ``[N]``, ``[c]``... (an organic-subset atom bracketed only because
  it has fewer H than its default valence, i.e. a radical) ambiguous with a wrapped bare atom. The
  encoder writes those as ``[CH0]``, ``[NH0]``..., the same atom spelled unambiguously, and the
  decoder turns them back into ``[C]``, ``[N]``. Upstream 3DMolGen does not do this and silently
  turns such radicals into saturated atoms on decoding.
- Coordinates are truncated toward zero (not rounded) to ``precision`` decimals of the value's
  shortest decimal form (``repr``), and a value that truncates to zero is written ``0.0000``, never
  ``-0.0000``. Truncation keeps every decoded value within ``10**-precision`` of the original.
- Bonds, ring closures (``1``, ``%10``, ``%(123)``), branches and ``.`` are copied unchanged, so
  :func:`strip_smiles` gives back exactly the canonical SMILES the encoder started from.
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_DOWN, Decimal
from typing import NamedTuple, NoReturn

from rdkit import Chem, rdBase
from rdkit.Geometry import Point3D

__all__ = ["DEFAULT_PRECISION", "DecodeError", "Encoded", "decode", "encode", "same_graph", "strip_smiles",
           "write_smiles"]

DEFAULT_PRECISION = 4  # decimals per coordinate, 3DMolGen's GEOM-Drugs setting (spec §1.4)

# SMILES organic subset (OpenSMILES 3.1.5): the only atoms that may appear without brackets.
ORGANIC_SUBSET = frozenset({"B", "C", "N", "O", "P", "S", "F", "Cl", "Br", "I", "b", "c", "n", "o", "p", "s", "*"})
# Token text -> SMILES text for RDKit's bracketed H-less organic atoms, which the encoder spells [XH0].
_H0_ATOMS = {f"{symbol}H0": f"[{symbol}]" for symbol in ORGANIC_SUBSET}

# Everything in a SMILES string that is not an atom. Ring closures: one digit, %nn, or RDKit's %(nnn)
# for ring numbers above 99. '$' is the quadruple bond RDKit can write.
_NON_ATOM = r"(?P<ring>%\d{2}|%\(\d+\)|\d)|(?P<bond>[-=#$:/\\])|(?P<branch>[()])|(?P<dot>\.)"
_SMILES_TOKEN = re.compile(r"(?P<bracket>\[[^\[\]]+\])|(?P<bare>Cl|Br|[BCNOPSFI]|[bcnops]|\*)|" + _NON_ATOM)
_ENRICHED_TOKEN = re.compile(r"(?P<atom>\[[^\[\]<>]+\])(?:<(?P<coords>[^<>\[\]]*)>)?|" + _NON_ATOM)
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_COORDS = re.compile(rf"({_NUMBER}),({_NUMBER}),({_NUMBER})")
_EXCERPT = 24  # characters of context either side of a decode error


class DecodeError(ValueError):
    """An enriched string that does not describe a molecule with coordinates.

    ``position`` is the character offset where decoding failed (``None`` when the failure concerns
    the whole string, e.g. RDKit rejecting the rebuilt SMILES); the message quotes the text around it.
    """

    def __init__(self, reason: str, text: str, position: int | None = None) -> None:
        self.reason, self.text, self.position = reason, text, position
        if position is None:
            where = f"(length {len(text)})"
        else:
            lo, hi = max(0, position - _EXCERPT), position + _EXCERPT
            excerpt = ("..." if lo else "") + text[lo:hi] + ("..." if hi < len(text) else "")
            where = f"at position {position} near {excerpt!r}"
        super().__init__(f"cannot decode enriched SMILES {where}: {reason}")


class Encoded(NamedTuple):
    """What :func:`encode` returns; unpacks as ``(canonical_smiles, enriched)``."""

    smiles: str  # canonical isomeric SMILES of the H-free molecule: the prompt of spec §1.2
    enriched: str  # the same SMILES with bracketed atoms and a <x,y,z> block after each


def write_smiles(mol: Chem.Mol) -> tuple[str, list[int]]:
    """Canonical isomeric SMILES of ``mol`` as is, and the atom index behind each atom token.

    ``order[i]`` is the index in ``mol`` of the i-th atom written, read from the
    ``_smilesAtomOutputOrder`` property RDKit sets while writing.
    """
    smiles = Chem.MolToSmiles(mol, isomericSmiles=True, canonical=True)
    order = [int(i) for i in re.findall(r"\d+", mol.GetProp("_smilesAtomOutputOrder"))]
    return smiles, order


def _truncate(value: float, precision: int) -> str:
    # Decimal(repr(x)) is the shortest decimal that reads back as x, so 0.29 truncates to "0.29",
    # not to "0.28" as int(0.29 * 100) would; ROUND_DOWN rounds toward zero.
    truncated = Decimal(repr(value)).quantize(Decimal(1).scaleb(-precision), rounding=ROUND_DOWN)
    return format(abs(truncated) if truncated == 0 else truncated, "f")  # abs: no "-0.0000"


def encode(mol: Chem.Mol, precision: int = DEFAULT_PRECISION, conf_id: int = -1) -> Encoded:
    """Enriched SMILES of one conformer of ``mol``; hydrogens are removed first (spec §1.2).

    ``RemoveHs`` keeps only the H atoms that must stay explicit (isotopic H, H2, ...); they are atoms
    with coordinates like any other. H counts, charges, isotopes and stereo are whatever ``mol``
    carries: nothing is perceived from the 3D geometry.

    Args:
        mol: sanitised molecule with at least one conformer (hydrogens explicit or not).
        precision: decimals kept per coordinate (truncated).
        conf_id: the conformer to write; -1 is RDKit's default (the first).

    Raises:
        ValueError: ``mol`` has no conformer, a coordinate is not finite, or ``precision`` is not a
            non-negative int.
    """
    if isinstance(precision, bool) or not isinstance(precision, int) or precision < 0:
        raise ValueError(f"precision must be a non-negative int, got {precision!r}")
    if mol.GetNumConformers() == 0:
        raise ValueError(f"cannot encode {Chem.MolToSmiles(mol)!r}: the molecule has no conformer")
    heavy = Chem.RemoveHs(mol)
    positions = heavy.GetConformer(conf_id).GetPositions()
    smiles, order = write_smiles(heavy)
    tokens = list(_SMILES_TOKEN.finditer(smiles))
    n_atoms = sum(m.lastgroup in ("bracket", "bare") for m in tokens)
    if "".join(m.group() for m in tokens) != smiles or n_atoms != len(order):
        raise ValueError(f"cannot tokenize RDKit SMILES {smiles!r}: {n_atoms} atom tokens for {len(order)} atoms")
    parts: list[str] = []
    atoms = 0
    for match in tokens:
        kind, token = match.lastgroup, match.group()
        if kind not in ("bracket", "bare"):
            parts.append(token)
            continue
        if kind == "bare":
            token = f"[{token}]"
        elif token[1:-1] in ORGANIC_SUBSET:
            token = f"[{token[1:-1]}H0]"  # RDKit's radical [C]: keep it apart from a wrapped bare C
        index = order[atoms]
        xyz = positions[index]
        if not all(math.isfinite(v) for v in xyz):
            raise ValueError(f"cannot encode {smiles!r}: atom {index} has a non-finite coordinate {tuple(xyz)}")
        parts.append(f"{token}<{','.join(_truncate(float(v), precision) for v in xyz)}>")
        atoms += 1
    return Encoded(smiles, "".join(parts))


def _scan(text: str) -> tuple[str, list[tuple[float, float, float]]]:
    """Plain SMILES and per-atom coordinates of an enriched string; DecodeError on bad syntax."""
    smiles: list[str] = []
    coords: list[tuple[float, float, float]] = []
    pos = 0
    while pos < len(text):
        match = _ENRICHED_TOKEN.match(text, pos)
        if match is None:
            char = text[pos]
            if char == "<":
                raise DecodeError("coordinate block without an atom before it", text, pos)
            if char.isalpha() or char == "*":
                raise DecodeError(f"bare atom {char!r}: every atom must be bracketed and carry <x,y,z>", text, pos)
            raise DecodeError(f"unexpected character {char!r}", text, pos)
        if match.group("atom") is not None:
            atom, block = match.group("atom"), match.group("coords")
            if block is None:
                after = match.end("atom")
                if after < len(text) and text[after] == "<":
                    raise DecodeError("unterminated coordinate block", text, after)
                raise DecodeError(f"atom {atom} has no <x,y,z> coordinate block", text, after)
            values = _COORDS.fullmatch(block)
            if values is None:
                count = len(block.split(",")) if block else 0
                raise DecodeError(f"malformed coordinate block <{block}>: expected 3 comma-separated "
                                  f"decimals, got {count} value(s)", text, match.start("coords") - 1)
            coords.append((float(values[1]), float(values[2]), float(values[3])))
            inner = atom[1:-1]
            smiles.append(inner if inner in ORGANIC_SUBSET else _H0_ATOMS.get(inner, atom))
        else:
            smiles.append(match.group())
        pos = match.end()
    return "".join(smiles), coords


def strip_smiles(enriched: str) -> str:
    """The plain SMILES of an enriched string: coordinate blocks removed, wrapped atoms un-wrapped.

    For :func:`encode`'s output this is exactly the canonical SMILES it returned.

    Raises:
        DecodeError: the string is not well-formed enriched SMILES (the chemistry is not checked).
    """
    return _scan(enriched)[0]


def _with_conformer(mol: Chem.Mol, coords: list[tuple[float, float, float]], text: str) -> Chem.Mol:
    # Parsing with removeHs=False keeps one atom per token, so a mismatch means a tokenizer/RDKit
    # disagreement; it is checked rather than assumed because the conformer is filled by index.
    if mol.GetNumAtoms() != len(coords):
        raise DecodeError(f"atom count mismatch: RDKit parsed {mol.GetNumAtoms()} atoms but the string has "
                          f"{len(coords)} coordinate blocks", text)
    conformer = Chem.Conformer(mol.GetNumAtoms())
    for index, (x, y, z) in enumerate(coords):
        conformer.SetAtomPosition(index, Point3D(x, y, z))
    conformer.Set3D(True)
    mol.AddConformer(conformer, assignId=True)
    return mol


def decode(enriched: str) -> Chem.Mol:
    """Sanitised RDKit molecule with one conformer; atom i is the i-th atom token of ``enriched``.

    Explicit ``[H]``/``[2H]`` atoms of the string stay atoms (they have coordinates), so no implicit
    hydrogens are added as atoms: the result is as hydrogen-free as the encoded molecule was.
    The grammar is strict, as the encoder writes it: no whitespace, plain decimals (no exponents).

    Raises:
        DecodeError: bad syntax (with the character position), SMILES that RDKit cannot parse or
            sanitise (with RDKit's reason), or an atom-count mismatch (with both counts).
    """
    smiles, coords = _scan(enriched)
    if not coords:
        raise DecodeError("no atoms", enriched, 0)
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles, _parser(sanitize=True))
        if mol is None:
            _raise_parse_error(smiles, enriched)
    return _with_conformer(mol, coords, enriched)


def _parser(sanitize: bool) -> Chem.SmilesParserParams:
    params = Chem.SmilesParserParams()
    params.removeHs = False  # an explicit [H] token is an atom with coordinates
    params.sanitize = sanitize
    return params


def _raise_parse_error(smiles: str, enriched: str) -> NoReturn:
    """Say whether RDKit failed to read the rebuilt SMILES or to sanitise what it read."""
    raw = Chem.MolFromSmiles(smiles, _parser(sanitize=False))
    if raw is None:
        raise DecodeError(f"RDKit cannot parse the rebuilt SMILES {smiles!r} (unclosed ring or branch, "
                          "or a bad atom or bond)", enriched)
    try:
        Chem.SanitizeMol(raw)
    except Exception as err:  # RDKit raises several sanitisation exception types
        raise DecodeError(f"rebuilt SMILES {smiles!r} is not a valid molecule: {err}", enriched) from None
    raise DecodeError(f"RDKit rejected the rebuilt SMILES {smiles!r}", enriched)


def same_graph(smiles_a: str, smiles_b: str) -> bool:
    """Whether two SMILES are the same molecular graph, ignoring stereo (3DMolGen's reward gate).

    Both are parsed, hydrogens removed, and their non-isomeric canonical SMILES compared (spec §1.2).
    That ignores tetrahedral and E/Z stereo and heavy-atom isotope labels (``[13CH3]O`` matches
    ``CO``), but not charges, and isotopic H stay atoms (``[2H]OC`` does not match ``CO``). A SMILES
    that RDKit cannot parse matches nothing (``False``): the gate rejects it instead of crashing a batch.
    """
    keys = []
    with rdBase.BlockLogs():
        for smiles in (smiles_a, smiles_b):
            mol = Chem.MolFromSmiles(smiles)
            if mol is None:
                return False
            keys.append(Chem.MolToSmiles(Chem.RemoveHs(mol), isomericSmiles=False, canonical=True))
    return keys[0] == keys[1]
