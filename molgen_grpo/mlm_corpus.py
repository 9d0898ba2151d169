"""The text the project's tiny masked LM learns from, built offline from what exists on this machine.

* **SMILES**: RDKit-canonical QM9 molecules (``../shared/data/qm9_smiles.txt``), a seeded subset.
* **Proteins**: the polymer sequences of real PDB entries: the three of ``../shared/data/pdb`` (1CRN, 1UBQ,
  1BNI) and the structures that installed libraries ship as data (PoseBusters' four example complexes, TM-tools'
  2GTL and 7OK9), read with gemmi (SEQRES where present, else the modelled residues), de-duplicated.
  About 15 distinct chains: real text, but little of it.
* **DNA**: no real nucleotide text ships here. The DNA is *synthetic*: each protein chain reverse-translated
  with the standard genetic code (biotite's ``CodonTable``), each codon drawn uniformly among the amino
  acid's synonymous codons (seeded), plus a stop codon: coding sequences with a real reading-frame
  structure and no real codon bias.

Held-out splits: 5 % of the SMILES; whole PDB entries (``heldout_entries``, so no sibling chain of a held-out
chain is trained on; near-identical chains are kept once) and the DNA of their chains.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

MIN_PROTEIN_LENGTH = 20  # shorter polymer entities (peptide ligands such as 7OK9's GGGGG) are left out
SAME_CHAIN_RATIO = 0.9  # difflib similarity at which two chains count as one (copies with missing residues)


@dataclass
class Corpus:
    """Train / held-out sequences per modality (``smiles``, ``protein``, ``dna``) and where they came from."""

    train: dict[str, list[str]] = field(default_factory=dict)
    heldout: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)


def library_structures() -> list[Path]:
    """PDB files that installed packages ship as data (PoseBusters examples, TM-tools test structures)."""
    found: list[Path] = []
    for package, pattern in (("posebusters", "datasets/pdb/*/*_protein*.pdb"), ("tmtools", "data/*.pdb")):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            found += sorted(Path(spec.origin).parent.glob(pattern))
    return found


def protein_sequences(paths: Iterable[Path]) -> list[tuple[str, str]]:
    """``(name, one-letter sequence)`` of every distinct protein chain of the structure files, in order."""
    import gemmi

    out, seen = [], set()
    for path in paths:
        structure = gemmi.read_structure(str(path))
        structure.setup_entities()
        for entity in structure.entities:
            if entity.entity_type != gemmi.EntityType.Polymer or entity.polymer_type != gemmi.PolymerType.PeptideL:
                continue
            names = list(entity.full_sequence)
            if not names:  # no SEQRES: the modelled residues of the entity's first chain
                chain = next(ch for ch in structure[0] if ch.name in entity.subchains or
                             any(r.subchain in entity.subchains for r in ch))
                names = [r.name for r in chain if r.subchain in entity.subchains]
            sequence = gemmi.one_letter_code(names).upper().replace("X", "")
            if len(sequence) >= MIN_PROTEIN_LENGTH and not any(_same(sequence, s) for s in seen):
                seen.add(sequence)
                out.append((f"{Path(path).stem.split('_')[0]}:{entity.name}", sequence))
    return out


def _same(a: str, b: str) -> bool:
    from difflib import SequenceMatcher

    return SequenceMatcher(None, a, b, autojunk=False).ratio() >= SAME_CHAIN_RATIO


def reverse_translate(protein: str, rng: random.Random) -> str:
    """A coding sequence for ``protein``: a uniformly drawn synonymous codon per residue, then a stop codon."""
    from biotite.sequence import CodonTable

    table = CodonTable.default_table()
    return "".join(rng.choice(sorted(table[aa])) for aa in protein) + rng.choice(sorted(table["*"]))


def build_corpus(smiles_file: Path, structure_files: Sequence[Path], max_smiles: int = 20000,
                 heldout_entries: Sequence[str] = ("1crn", "1of6"), seed: int = 0) -> Corpus:
    """The corpus of the module docstring; ``max_smiles`` QM9 lines drawn with ``seed`` (5 % held out), the
    chains of ``heldout_entries`` (PDB ids) held out."""
    rng = random.Random(seed)
    lines = [s.strip() for s in Path(smiles_file).read_text().splitlines() if s.strip()]
    picked = rng.sample(lines, min(max_smiles, len(lines)))
    cut = max(1, len(picked) // 20)
    proteins = protein_sequences(structure_files)
    held_entries = {e.lower() for e in heldout_entries}  # whole entries held out: no sibling chain is trained on
    held = [p for p in proteins if p[0].split(":")[0] in held_entries]
    train = [p for p in proteins if p[0].split(":")[0] not in held_entries]
    dna_rng = random.Random(seed + 1)
    corpus = Corpus()
    corpus.train = {"smiles": picked[cut:], "protein": [s for _, s in train],
                    "dna": [reverse_translate(s, dna_rng) for _, s in train]}
    corpus.heldout = {"smiles": picked[:cut], "protein": [s for _, s in held],
                      "dna": [reverse_translate(s, dna_rng) for _, s in held]}
    corpus.sources = {"smiles": [f"{smiles_file} ({len(picked)} of {len(lines)} lines, seed {seed})"],
                      "protein_train": [n for n, _ in train], "protein_heldout": [n for n, _ in held],
                      "dna": ["reverse-translated protein chains (synthetic, uniform synonymous codons)"]}
    return corpus
