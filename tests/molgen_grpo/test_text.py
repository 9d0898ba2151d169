"""Enriched SMILES (spec §1.2): exact strings by hand, round trips on real molecules, decode errors."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit")

from rdkit import Chem  # noqa: E402
from rdkit.Chem import AllChem  # noqa: E402
from rdkit.Geometry import Point3D  # noqa: E402

from molgen_grpo.text import (  # noqa: E402
    DecodeError,
    _with_conformer,
    decode,
    encode,
    same_graph,
    strip_smiles,
    write_smiles,
)

QM9_SMILES_PATH = Path(os.environ.get(
    "ELIGN_QM9_SMILES", Path(__file__).resolve().parents[2].parent / "shared" / "data" / "qm9_smiles.txt"))
QM9_SAMPLE_SEED = 14
QM9_SAMPLE_DRAW = 36
# random.Random(QM9_SAMPLE_SEED).sample(non-empty lines, 36), first 30 that ETKDGv3 (seed 0) embeds;
# written out so the tests do not need the shared file (test_qm9_sample_is_the_seeded_draw re-derives it).
QM9_SAMPLE = (
    "NC(=O)OC[C@H]1CCO1", "ON=C1[C@H]2C[C@@H]1N1C[C@@H]21", "C[C@@H]1C[C@@H]2O[C@]12[C@@H](C)O", "Cc1cn(C)nc1O",
    "O=CCN(C=O)C1CC1", "C1OC[C@@]23OC[C@@H]2N[C@@H]13", "CO[C@@H]1C=C[C@H](C)O1", "C1=C2CCC[C@H]2CCC1",
    "CC(=O)C(=O)CCC#N", "c1noc2c1C[C@H]1O[C@@H]21", "Nc1cc(N)n(C=O)n1", "N[C@@]1([C@H]2CO2)COC1=O",
    "C[C@@]1(C#C[C@H]2CN2)CN1", "O=C([C@H]1CO1)[C@@H]1C[C@@H]1O", "CC(=O)c1nc(O)c[nH]1", "CNC(=O)[C@H]1C[C@H]1C",
    "O=c1cc(O)ocn1", "C#C[C@H]1C[C@H](C(C)=O)C1", "C#C[C@@]12[C@H]3CN1[C@@H]2CO3", "C#C[C@]12[C@@H]3[C@H]1C[C@@H]3N2C",
    "CN1C(=O)[C@@H]2OCC[C@@H]21", "O=CC[C@@H]1C[C@H](O)C1=O", "CNc1oncc1C=O", "CC#C[C@@](C)(N)C(=O)O",
    "N#C[C@H]1[C@H]2C(=NO)CN21", "N#C[C@]1(O)CCC12CC2", "C[C@]12[C@H](O)[C@@H]3C=C[C@H]1N32", "CC(=O)NC=NCC#N",
    "C[C@]12C[C@H](C1)[C@H](C#N)O2", "C[C@@]12CO[C@@H](C1)C(=O)O2",
)

# Drug-like molecules, each with the token its encoding must contain (the feature it is here for).
DRUG_LIKE = (
    ("C[C@H]([NH3+])C(=O)[O-]", "[NH3+]<"),  # zwitterionic alanine: charges and a stereocentre
    ("CC(C)Cc1ccc([C@@H](C)C(=O)O)cc1", "@"),  # ibuprofen
    ("CN[C@@H](C)[C@H](O)c1ccccc1", "@@"),  # ephedrine: two stereocentres
    ("c1ccc2[nH]ccc2c1", "[nH]<"),  # indole
    ("NCCc1c[nH]cn1", "[nH]<"),  # histamine (imidazole)
    ("[13CH3]Oc1ccccc1", "[13CH3]<"),  # isotope label
    ("[2H]C([2H])([2H])Oc1ccc(Cl)cc1Br", "[2H]<"),  # deuterium survives RemoveHs as atoms; Cl, Br
    ("C/C=C/C(=O)O", "/"),  # E double bond
    ("C[NH+](C)CCc1ccccc1.[Cl-]", "."),  # hydrochloride salt: two fragments
    ("CC(=O)[O-].[Na+]", "[Na+]<"),  # sodium acetate
    ("Cc1ccc(S(N)(=O)=O)cc1", "[S]<"),  # sulfonamide
    ("CC(C)(C)OC(=O)N[C@@H](Cc1ccccc1)C(=O)O", "[C@@H]<"),  # Boc-phenylalanine
    ("FC(F)(F)c1ccc(I)cc1", "[I]<"),
)

C60 = ("c12c3c4c5c1c1c6c7c2c2c8c3c3c9c4c4c%10c5c5c1c1c6c6c%11c7c2c2c7c8c3c3c8c9c4c4c9c%10c5c5c1c1c6c6c%11"
       "c2c2c7c3c3c8c4c4c9c5c1c1c6c2c3c41")


def embed(smiles: str, seed: int = 0) -> Chem.Mol:
    """Molecule with explicit H and one ETKDGv3 conformer (fixed seed)."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    assert AllChem.EmbedMolecule(mol, params) == 0, f"ETKDG failed on {smiles}"
    return mol


def with_coordinates(smiles: str, coords) -> Chem.Mol:
    """Molecule from ``smiles`` (no H added) with hand-set coordinates, one row per atom."""
    mol = Chem.MolFromSmiles(smiles)
    conformer = Chem.Conformer(mol.GetNumAtoms())
    for index, xyz in enumerate(coords):
        conformer.SetAtomPosition(index, Point3D(*xyz))
    mol.AddConformer(conformer)
    return mol


def assert_round_trip(mol: Chem.Mol, precision: int = 4) -> str:
    """encode -> decode recovers atom order, elements, charges, isotopes, bonds and coordinates."""
    smiles, enriched = encode(mol, precision)
    heavy = Chem.RemoveHs(mol)
    reference_smiles, order = write_smiles(heavy)
    assert smiles == reference_smiles
    assert strip_smiles(enriched) == smiles
    assert enriched.count("<") == heavy.GetNumAtoms()
    decoded = decode(enriched)
    assert decoded.GetNumConformers() == 1
    assert Chem.MolToSmiles(decoded) == smiles  # same graph, charges, isotopes and stereo
    assert decoded.GetNumAtoms() == heavy.GetNumAtoms()
    for i, j in enumerate(order):
        a, b = decoded.GetAtomWithIdx(i), heavy.GetAtomWithIdx(j)
        assert (a.GetSymbol(), a.GetFormalCharge(), a.GetIsotope(), a.GetTotalNumHs()) == (
            b.GetSymbol(), b.GetFormalCharge(), b.GetIsotope(), b.GetTotalNumHs())
    for bond in decoded.GetBonds():
        twin = heavy.GetBondBetweenAtoms(order[bond.GetBeginAtomIdx()], order[bond.GetEndAtomIdx()])
        assert twin is not None and twin.GetBondType() == bond.GetBondType()
    assert decoded.GetNumBonds() == heavy.GetNumBonds()
    expected = heavy.GetConformer().GetPositions()[order]
    got = decoded.GetConformer().GetPositions()
    assert np.all(np.abs(got - expected) < 10.0**-precision)
    assert np.all(np.abs(got) <= np.abs(expected))  # truncated toward zero, never rounded away
    return enriched


# -- exact strings, by hand ----------------------------------------------------------------------------

# Acetic acid written as OC(C)=O: atoms O0 (hydroxyl), C1 (carboxyl), C2 (methyl), O3 (carbonyl).
# RDKit's canonical SMILES is CC(=O)O, which writes them in the order 2, 1, 3, 0.
ACETIC_ACID_COORDS = [
    (-1.23456, 0.00004, 2.0),  # O0
    (0.0, -0.00004, 0.29),  # C1: -0.00004 truncates to zero and is written without a sign
    (1.23456, 2.99999, -0.5),  # C2: truncation, not rounding (2.99999 -> 2.9999, not 3.0000)
    (10.0, -10.000049, 1e-05),  # O3
]
ACETIC_ACID = ("[C]<1.2345,2.9999,-0.5000>[C]<0.0000,0.0000,0.2900>(=[O]<10.0000,-10.0000,0.0000>)"
               "[O]<-1.2345,0.0000,2.0000>")


def test_hand_checked_acetic_acid():
    mol = with_coordinates("OC(C)=O", ACETIC_ACID_COORDS)
    assert write_smiles(mol) == ("CC(=O)O", [2, 1, 3, 0])
    assert encode(mol) == ("CC(=O)O", ACETIC_ACID)
    assert strip_smiles(ACETIC_ACID) == "CC(=O)O"
    decoded = decode(ACETIC_ACID)
    assert [a.GetSymbol() for a in decoded.GetAtoms()] == ["C", "C", "O", "O"]
    np.testing.assert_array_equal(decoded.GetConformer().GetPositions(),
                                  [[1.2345, 2.9999, -0.5], [0, 0, 0.29], [10, -10, 0], [-1.2345, 0, 2]])


def test_precision_and_negative_values():
    mol = with_coordinates("OC(C)=O", ACETIC_ACID_COORDS)
    assert encode(mol, precision=2).enriched == (
        "[C]<1.23,2.99,-0.50>[C]<0.00,0.00,0.29>(=[O]<10.00,-10.00,0.00>)[O]<-1.23,0.00,2.00>")
    assert encode(mol, precision=0).enriched == "[C]<1,2,0>[C]<0,0,0>(=[O]<10,-10,0>)[O]<-1,0,2>"
    assert "-0.0" not in encode(with_coordinates("C", [(-0.00001, -1e-12, -0.0)])).enriched
    assert encode(with_coordinates("C", [(-0.00001, -1e-12, -0.0)])).enriched == "[C]<0.0000,0.0000,0.0000>"


def test_bracket_atoms_are_copied_and_radicals_kept_apart():
    mol = with_coordinates("C[N]C", [(0, 0, 0), (1.5, 0, 0), (2, 1.2, 0)])
    smiles, enriched = encode(mol)
    assert smiles == "C[N]C"
    assert enriched == "[C]<0.0000,0.0000,0.0000>[NH0]<1.5000,0.0000,0.0000>[C]<2.0000,1.2000,0.0000>"
    assert strip_smiles(enriched) == "C[N]C"
    decoded = decode(enriched)
    assert decoded.GetAtomWithIdx(1).GetNumRadicalElectrons() == 1  # not dimethylamine
    assert decode("[C]<0,0,0>[N]<1.5,0,0>[C]<2,1.2,0>").GetAtomWithIdx(1).GetTotalNumHs() == 1


def test_explicit_hydrogens_stay_atoms():
    mol = with_coordinates("[H][H]", [(-0.37, 0, 0), (0.37, 0, 0)])
    assert encode(mol).enriched == "[H]<-0.3700,0.0000,0.0000>[H]<0.3700,0.0000,0.0000>"
    assert decode(encode(mol).enriched).GetNumAtoms() == 2
    # An [H] token on a heavy atom (never written by the encoder, possible from a model) keeps its
    # coordinates as an atom instead of being folded into an H count by the SMILES parser.
    methanol = decode("[C]<0,0,0>([H]<1.09,0,0>)[O]<-0.7,1.2,0>")
    assert [a.GetSymbol() for a in methanol.GetAtoms()] == ["C", "H", "O"]
    np.testing.assert_array_equal(methanol.GetConformer().GetPositions()[1], [1.09, 0, 0])


def test_encoder_does_not_perceive_stereo_from_3d():
    mol = embed("CC(N)O")  # the conformer is chiral, the molecule as given has no stereo tag
    smiles, enriched = encode(mol)
    assert smiles == "CC(N)O" and "@" not in enriched


# -- round trips on real molecules ------------------------------------------------------------------------


def test_qm9_sample_is_the_seeded_draw():
    if not QM9_SMILES_PATH.is_file():
        pytest.skip(f"{QM9_SMILES_PATH} not available")
    lines = [ln.strip() for ln in QM9_SMILES_PATH.read_text().splitlines() if ln.strip()]
    drawn = random.Random(QM9_SAMPLE_SEED).sample(lines, QM9_SAMPLE_DRAW)
    it = iter(drawn)
    assert all(any(s == d for d in it) for s in QM9_SAMPLE), "sample is not an ordered subset of the draw"
    assert len(QM9_SAMPLE) == 30


@pytest.mark.parametrize("smiles", QM9_SAMPLE)
def test_round_trip_qm9(smiles):
    enriched = assert_round_trip(embed(smiles))
    assert "@" in enriched or "@" not in smiles


@pytest.mark.parametrize(("smiles", "feature"), DRUG_LIKE)
def test_round_trip_drug_like(smiles, feature):
    enriched = assert_round_trip(embed(smiles))
    assert feature in enriched


def test_round_trip_two_digit_ring_closures():
    mol = Chem.MolFromSmiles(C60)  # 32 rings; coordinates need not be physical for the format
    rng = np.random.default_rng(0)
    conformer = Chem.Conformer(mol.GetNumAtoms())
    for index, xyz in enumerate(rng.normal(scale=3.0, size=(mol.GetNumAtoms(), 3))):
        conformer.SetAtomPosition(index, Point3D(*map(float, xyz)))
    mol.AddConformer(conformer)
    enriched = assert_round_trip(mol)
    assert "%10" in enriched and "%11" in enriched


@pytest.mark.parametrize("precision", [0, 2, 6])
def test_round_trip_other_precisions(precision):
    assert_round_trip(embed("CC(C)Cc1ccc([C@@H](C)C(=O)O)cc1"), precision)


# -- errors -------------------------------------------------------------------------------------------------


def test_decode_truncated_inside_a_coordinate_block():
    cut = ACETIC_ACID[: ACETIC_ACID.index("-10.0000")]
    with pytest.raises(DecodeError, match="unterminated coordinate block") as info:
        decode(cut)
    assert info.value.position == ACETIC_ACID.index("<10.0000")


def test_decode_truncated_after_a_branch_opens():
    cut = ACETIC_ACID[: ACETIC_ACID.index("(") + 1]
    with pytest.raises(DecodeError, match=r"cannot parse the rebuilt SMILES 'CC\('"):
        decode(cut)


def test_decode_two_value_block():
    with pytest.raises(DecodeError, match=r"<1.0,2.0>.*got 2 value") as info:
        decode("[C]<0,0,0>[O]<1.0,2.0>")
    assert info.value.position == 13
    assert "position 13" in str(info.value)


def test_decode_atom_count_mismatch():
    with pytest.raises(DecodeError, match="RDKit parsed 3 atoms but the string has 2 coordinate blocks"):
        _with_conformer(Chem.MolFromSmiles("CCO"), [(0.0, 0.0, 0.0)] * 2, "[C]<0,0,0>[C]<0,0,0>")


@pytest.mark.parametrize(("text", "message", "position"), [
    ("C<0,0,0>", "bare atom 'C'", 0),
    ("[C]<0,0,0>[C]", "has no <x,y,z>", 13),
    ("[C]<0,0,0><1,2,3>", "coordinate block without an atom", 10),
    ("[C]<0,0,0>?", "unexpected character '?'", 10),
    ("[C]<0,0,zero>", "malformed coordinate block", 3),
    ("[C]<1,2,3,4>", "got 4 value", 3),
    ("", "no atoms", 0),
])
def test_decode_syntax_errors_name_the_position(text, message, position):
    with pytest.raises(DecodeError, match=message) as info:
        decode(text)
    assert info.value.position == position
    if text:  # strip_smiles shares the syntax checks (not the chemistry ones)
        with pytest.raises(DecodeError, match=message):
            strip_smiles(text)


def test_decode_invalid_chemistry_is_quiet(capfd):
    with pytest.raises(DecodeError, match="not a valid molecule: .*valence"):
        decode("[C]<0,0,0>(=[C]<1,0,0>)(=[C]<2,0,0>)=[C]<3,0,0>=[O]<4,0,0>")
    assert isinstance(DecodeError("x", ""), ValueError)
    assert capfd.readouterr().err == ""  # RDKit's own messages are silenced


def test_encode_errors():
    with pytest.raises(ValueError, match="no conformer"):
        encode(Chem.MolFromSmiles("CCO"))
    with pytest.raises(ValueError, match="non-finite coordinate"):
        encode(with_coordinates("CO", [(0, 0, 0), (math.nan, 0, 0)]))
    with pytest.raises(ValueError, match="precision"):
        encode(with_coordinates("C", [(0, 0, 0)]), precision=-1)


# -- graph identity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "same"), [
    ("C[C@H](O)CC", "C[C@@H](O)CC", True),  # enantiomers
    ("C/C=C/C", "C/C=C\\C", True),  # E / Z
    ("[H]OCC", "CCO", True),  # explicit vs implicit H
    ("OCC", "CCO", True),  # different spellings
    ("CCO", "COC", False),  # constitutional isomers
    ("CCCO", "CC(C)O", False),
    ("CC(=O)O", "CC(=O)[O-]", False),  # charge matters
    ("[13CH3]O", "CO", True),  # non-isomeric SMILES drop heavy-atom isotope labels...
    ("[2H]OC", "CO", False),  # ...but an isotopic H survives RemoveHs as an atom
    ("CCO", "C1CC", False),  # unparseable matches nothing
])
def test_same_graph(a, b, same):
    assert same_graph(a, b) is same
    assert same_graph(b, a) is same
