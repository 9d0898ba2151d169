"""Chemical Component Dictionary molecules for boltz's parsers, built offline from biotite's CCD.

boltz looks each residue up as an RDKit molecule pickled in its ``mols/`` directory (downloaded by
``boltz predict``); offline its parsers stop at "CCD component ALA not found". biotite ships the whole
CCD (``biotite/structure/info/components.bcif``), so the same molecules can be built here: CCD atom
names, charges, bonds, the leaving-atom flags and the ideal coordinates as a conformer named
``Ideal``, which is what boltz's parsers read (``name`` / ``leaving_atom`` atom properties,
``get_conformer``).

    mols = CCDMolecules()
    parsed = boltz.data.parse.pdb.parse_pdb("1crn.pdb", mols=mols, moldir=None)
"""

from __future__ import annotations

import numpy as np
from rdkit import Chem

__all__ = ["CCDMolecules", "ccd_molecule"]


def ccd_molecule(code: str) -> Chem.Mol:
    """The RDKit molecule of CCD component ``code`` in boltz's layout (hydrogens kept; boltz drops them).

    Raises:
        KeyError: ``code`` is not in the CCD biotite ships.
    """
    import biotite.structure.info as info
    from biotite.interface.rdkit import to_mol

    try:
        atoms = info.residue(code)
    except KeyError as exc:
        raise KeyError(f"CCD component {code!r} is not in biotite's CCD ({info.__name__})") from exc
    leaving = info.get_from_ccd("chem_comp_atom", code, "pdbx_leaving_atom_flag")
    flags = np.asarray(leaving.as_array(str)) if leaving is not None else np.full(atoms.array_length(), "N")
    if len(flags) != atoms.array_length():
        raise ValueError(f"CCD component {code!r}: {len(flags)} leaving-atom flags for {atoms.array_length()} atoms")
    # explicit_hydrogen: the CCD lists every hydrogen; RDKit must not add or infer others.
    mol = to_mol(atoms, explicit_hydrogen=True)
    for atom, name, flag in zip(mol.GetAtoms(), atoms.atom_name, flags):
        atom.SetProp("name", str(name))
        atom.SetProp("leaving_atom", "1" if flag == "Y" else "0")
    mol.SetProp("_Name", code)
    (conformer,) = mol.GetConformers()
    conformer.SetProp("name", "Ideal")
    return mol


class CCDMolecules(dict):
    """A ``mols`` mapping for boltz's parsers that builds each component on first use and keeps it.

    boltz calls ``mols.get(code)`` and only reads its ``moldir`` when that returns None, so a missing
    component is built here instead; an unknown code still returns None, and boltz's own error names it.
    """

    def get(self, code: str, default: Chem.Mol | None = None) -> Chem.Mol | None:
        if code not in self:
            try:
                self[code] = ccd_molecule(code)
            except KeyError:
                return default
        return self[code]
