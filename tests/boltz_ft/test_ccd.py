"""CCD molecules from biotite in boltz's layout, and boltz's own PDB parser running offline on them."""

from pathlib import Path

import pytest

pytest.importorskip("biotite")
from boltz_ft.ccd import CCDMolecules, ccd_molecule  # noqa: E402

PDB = Path(__file__).resolve().parents[3] / "shared" / "data" / "pdb"


def test_alanine_has_ccd_names_leaving_flags_and_an_ideal_conformer():
    mol = ccd_molecule("ALA")
    names = [a.GetProp("name") for a in mol.GetAtoms()]
    # The CCD's ALA: 6 heavy atoms and 7 hydrogens; OXT, HXT and the second amine H (H2) are flagged
    # as leaving atoms (they go when the residue is bonded into a chain).
    assert names == ["N", "CA", "C", "O", "CB", "OXT", "H", "H2", "HA", "HB1", "HB2", "HB3", "HXT"]
    assert [a.GetProp("name") for a in mol.GetAtoms() if a.GetProp("leaving_atom") == "1"] == ["OXT", "H2", "HXT"]
    assert [a.GetSymbol() for a in mol.GetAtoms()][:6] == ["N", "C", "C", "O", "C", "O"]
    conformer = mol.GetConformer()
    assert conformer.GetProp("name") == "Ideal"
    pos = conformer.GetPositions()
    # CCD ideal coordinates: the N-CA bond of alanine is 1.46-1.47 Å.
    assert 1.44 < float(((pos[0] - pos[1]) ** 2).sum() ** 0.5) < 1.49
    c_o = mol.GetBondBetweenAtoms(names.index("C"), names.index("O"))
    assert c_o is not None and c_o.GetBondTypeAsDouble() == 2.0


def test_unknown_component_is_named_and_the_mapping_defers_to_boltz():
    with pytest.raises(KeyError, match="NOPE"):
        ccd_molecule("NOPE")
    mols = CCDMolecules()
    assert mols.get("NOPE") is None and "NOPE" not in mols
    assert mols.get("GLY") is mols.get("GLY"), "built once, then kept"


@pytest.mark.skipif(not (PDB / "1crn.pdb").is_file(), reason="embedded PDB files not present")
def test_boltz_parses_crambin_offline_with_these_molecules():
    parse_pdb = pytest.importorskip("boltz.data.parse.pdb").parse_pdb
    # compute_interfaces=False: the installed boltz shadows its own compute_interfaces function with
    # the flag of the same name (a known upstream bug), so True raises "'bool' object is not callable".
    parsed = parse_pdb(str(PDB / "1crn.pdb"), mols=CCDMolecules(), moldir=None, compute_interfaces=False)
    structure = parsed.data
    assert len(structure.chains) == 1 and len(structure.residues) == 46  # crambin: one chain of 46 residues
    # boltz keeps the canonical heavy atoms: 327 in the file less the C-terminal OXT.
    assert len(structure.atoms) == 326 and bool(structure.atoms["is_present"].all())
