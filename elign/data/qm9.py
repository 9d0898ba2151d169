"""Reader of the QM9 release (Ramakrishnan et al., Sci. Data 1, 140022, 2014) and EDM's split.

File format of one ``dsgdb9nsd_XXXXXX.xyz`` (extended XYZ, tab separated, numbers may use the
Mathematica exponent ``*^``, e.g. ``1.2*^-6`` = ``1.2e-6``):

    line 1        n, the atom count
    line 2        ``gdb <index>`` then 15 properties A B C mu alpha homo lumo gap r2 zpve U0 U H G Cv
    lines 3..n+2  ``element x y z mulliken_charge`` (Angstrom, elementary charges)
    line n+3      harmonic frequencies (cm^-1)
    line n+4      SMILES of the GDB-17 input and of the B3LYP-relaxed geometry
    line n+5      InChI of the same two

Property units: A, B, C GHz; mu Debye; alpha Bohr^3; homo, lumo, gap Hartree; r2 Bohr^2; zpve, U0, U,
H, G Hartree; Cv cal/(mol K).

Sources (figshare collection 978904): ``dsgdb9nsd.xyz.tar.bz2`` (133,885 molecules),
``uncharacterized.txt`` (3,054 molecules whose relaxed geometry failed the consistency check),
``atomref.txt`` (atomic reference energies; not read here).
"""

from __future__ import annotations

import os
import re
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from elign.engine.errors import ConfigError, DataFormatError

QM9_NUM_MOLECULES = 133_885
QM9_NUM_UNCHARACTERIZED = 3_054
PROPERTY_NAMES: tuple[str, ...] = (
    "A", "B", "C", "mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv",
)
ELEMENTS: dict[str, int] = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
SPLITS = ("train", "valid", "test", "all")
FIGSHARE_URLS: dict[str, str] = {
    "dsgdb9nsd.xyz.tar.bz2": "https://springernature.figshare.com/ndownloader/files/3195389",
    "uncharacterized.txt": "https://springernature.figshare.com/ndownloader/files/3195404",
    "atomref.txt": "https://springernature.figshare.com/ndownloader/files/3195395",
}
_MEMBER_INDEX = re.compile(r"dsgdb9nsd_(\d+)\.xyz$")


@dataclass(frozen=True)
class QM9Molecule:
    """One QM9 molecule.

    Attributes:
        index: GDB index, 1-based (``gdb 1`` is methane).
        positions: ``[n, 3]`` float64, Angstrom (B3LYP/6-31G(2df,p) geometry, not centred).
        atomic_numbers: ``[n]`` int64 (H 1, C 6, N 7, O 8, F 9).
        properties: the 15 scalar properties by name (units in the module docstring).
        smiles: GDB-17 SMILES (first column of the SMILES line).
        smiles_relaxed: SMILES of the relaxed geometry (second column).
        mulliken_charges: ``[n]`` float64, elementary charges.
        frequencies: ``[3n - 6]`` (``3n - 5`` if linear) float64, cm^-1.
        inchi, inchi_relaxed: the InChI line's two columns.
        name: where it was read from (file or archive member), for messages.
    """

    index: int
    positions: np.ndarray
    atomic_numbers: np.ndarray
    properties: dict[str, float]
    smiles: str
    smiles_relaxed: str = ""
    mulliken_charges: np.ndarray = field(default_factory=lambda: np.zeros(0))
    frequencies: np.ndarray = field(default_factory=lambda: np.zeros(0))
    inchi: str = ""
    inchi_relaxed: str = ""
    name: str = ""

    @property
    def num_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])


def _float(token: str, name: str, line: int, what: str) -> float:
    """Parse one number, accepting Mathematica's ``*^`` exponent; reject nan/inf (never in QM9)."""
    try:
        value = float(token.replace("*^", "e"))
    except ValueError:
        raise DataFormatError(name, line, f"cannot parse {what} {token!r} as a number") from None
    if not np.isfinite(value):
        raise DataFormatError(name, line, f"{what} {token!r} is not finite")
    return value


def read_qm9_xyz(text_or_path: str | os.PathLike[str], name: str | None = None) -> QM9Molecule:
    """Parse one QM9 ``.xyz`` file.

    Args:
        text_or_path: the file's text (any string containing a newline) or a path to it.
        name: name used in error messages (defaults to the path, or ``<string>``).
    Raises:
        DataFormatError: naming ``name`` and the 1-based line of the first problem.
    """
    if isinstance(text_or_path, str) and "\n" in text_or_path:
        text, where = text_or_path, name or "<string>"
    else:
        path = Path(text_or_path)
        where = name or str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataFormatError(where, None, f"not UTF-8 text ({err.reason})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing newline or blank line is not a format error
    if not lines:
        raise DataFormatError(where, 1, "empty file")
    try:
        n = int(lines[0].strip())
    except ValueError:
        raise DataFormatError(where, 1, f"expected the atom count, got {lines[0].strip()!r}") from None
    if n < 1:
        raise DataFormatError(where, 1, f"atom count must be positive, got {n}")
    # Checked first so that a wrong count is reported as such, not as an atom line that is really the
    # frequency line.
    if len(lines) != n + 5:
        raise DataFormatError(
            where, 1, f"atom count {n} implies {n + 5} lines (count, properties, {n} atoms, frequencies, "
            f"SMILES, InChI); the file has {len(lines)}"
        )

    head = lines[1].split()
    if len(head) != 2 + len(PROPERTY_NAMES) or head[0] != "gdb":
        raise DataFormatError(
            where, 2, f"expected 'gdb <index>' and {len(PROPERTY_NAMES)} properties, got {len(head)} fields"
        )
    try:
        index = int(head[1])
    except ValueError:
        raise DataFormatError(where, 2, f"GDB index {head[1]!r} is not an integer") from None
    member = _MEMBER_INDEX.search(where.rstrip("]"))
    if member and int(member.group(1)) != index:
        raise DataFormatError(where, 2, f"GDB index {index} does not match the file name")
    properties = {key: _float(tok, where, 2, key) for key, tok in zip(PROPERTY_NAMES, head[2:])}

    positions = np.empty((n, 3), dtype=np.float64)
    numbers = np.empty(n, dtype=np.int64)
    charges = np.empty(n, dtype=np.float64)
    for i in range(n):
        lineno = i + 3
        tokens = lines[i + 2].split()
        if len(tokens) != 5:
            raise DataFormatError(
                where, lineno, f"expected 'element x y z charge', got {len(tokens)} fields"
            )
        if tokens[0] not in ELEMENTS:
            raise DataFormatError(where, lineno, f"unknown element {tokens[0]!r} (QM9 has H, C, N, O, F)")
        numbers[i] = ELEMENTS[tokens[0]]
        for k, axis in enumerate("xyz"):
            positions[i, k] = _float(tokens[k + 1], where, lineno, f"{axis} coordinate")
        charges[i] = _float(tokens[4], where, lineno, "Mulliken charge")

    freq_line = n + 3
    frequencies = np.array(
        [_float(tok, where, freq_line, "frequency") for tok in lines[n + 2].split()], dtype=np.float64
    )
    smiles = lines[n + 3].split()
    if not smiles:
        raise DataFormatError(where, n + 4, "missing SMILES")
    inchi = lines[n + 4].split()
    if not inchi or not inchi[0].startswith("InChI="):
        raise DataFormatError(where, n + 5, "expected the InChI line")
    return QM9Molecule(
        index=index,
        positions=positions,
        atomic_numbers=numbers,
        properties=properties,
        smiles=smiles[0],
        smiles_relaxed=smiles[-1],
        mulliken_charges=charges,
        frequencies=frequencies,
        inchi=inchi[0],
        inchi_relaxed=inchi[-1],
        name=where,
    )


def _iter_members(source: str | os.PathLike[str]) -> Iterator[tuple[str, int | None, Path | bytes]]:
    """``(name, index from the file name or None, path or raw bytes)`` for every ``.xyz`` in ``source``.

    A directory is listed in sorted name order (the zero-padded names sort by index). An archive is
    read sequentially (``r|*``: streaming, nothing extracted to disk, no seeking in the bz2 stream) in
    member order.
    """
    src = Path(source)
    if src.is_dir():
        for path in sorted(p for p in src.iterdir() if p.suffix == ".xyz" and p.is_file()):
            m = _MEMBER_INDEX.search(path.name)
            yield str(path), (int(m.group(1)) if m else None), path
        return
    if not src.exists():
        raise FileNotFoundError(f"QM9 source not found: {src}")
    try:
        with tarfile.open(src, mode="r|*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".xyz"):
                    continue
                handle = tar.extractfile(member)
                assert handle is not None  # regular files always have data
                m = _MEMBER_INDEX.search(member.name)
                yield f"{src}[{member.name}]", (int(m.group(1)) if m else None), handle.read()
    except tarfile.TarError as err:
        raise DataFormatError(str(src), None, f"not a readable tar archive or directory ({err})") from None


def _parse_member(name: str, data: Path | bytes) -> QM9Molecule:
    if isinstance(data, Path):
        return read_qm9_xyz(data, name=name)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(name, None, f"not UTF-8 text ({err.reason})") from None
    return read_qm9_xyz(text if "\n" in text else text + "\n", name=name)


def iter_qm9(source: str | os.PathLike[str]) -> Iterator[QM9Molecule]:
    """Stream the molecules of a ``.tar.bz2`` (or any tar) archive or of a directory of ``.xyz`` files.

    Order: archive member order, or sorted file names for a directory.
    """
    for name, _, data in _iter_members(source):
        yield _parse_member(name, data)


def read_exclusion_list(path: str | os.PathLike[str]) -> list[int]:
    """1-based GDB indices listed in ``uncharacterized.txt``.

    Rule of upstream ``gen_splits_gdb9``: the first token of every non-empty line, kept when it is an
    integer; the header and footer lines start with text and are skipped.
    """
    indices: list[int] = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            value = int(tokens[0])
        except ValueError:
            continue
        if value < 1:
            raise DataFormatError(str(path), lineno, f"GDB index {value} is not positive")
        indices.append(value)
    return indices


def qm9_split_indices(
    n_total: int = QM9_NUM_MOLECULES,
    excluded: Sequence[int] = (),
    seed: int = 0,
    n_train: int = 100_000,
    test_fraction: float = 0.1,
) -> dict[str, np.ndarray]:
    """EDM's QM9 split (upstream ``qm9/data/prepare/qm9.py::gen_splits_gdb9``, also Cormorant's).

    Algorithm (positions are 0-based, position ``p`` = GDB index ``p + 1``):
      1. ``included`` = sorted positions ``0..n_total-1`` minus ``excluded`` (upstream: the
         uncharacterised list, GDB index - 1); ``n_mols = len(included)``.
      2. ``n_test = int(test_fraction * n_mols)``, ``n_valid = n_mols - n_train - n_test``.
      3. ``perm = RandomState(seed).permutation(n_mols)`` (identical to upstream's
         ``np.random.seed(0); np.random.permutation``, without touching the global RNG).
      4. ``train = included[perm[:n_train]]``, ``valid = included[perm[n_train:n_train + n_valid]]``,
         ``test = included[perm[n_train + n_valid:]]``.
    For the release with its 3,054 exclusions: 100,000 / 17,748 / 13,083.

    Args:
        excluded: 0-based positions to drop (duplicates ignored).
    Returns:
        ``{"train", "valid", "test"}`` -> int64 positions in permutation order (as upstream returns them).
    """
    if int(n_total) < 1:
        raise ConfigError("n_total", n_total, "a positive integer")
    excl = np.unique(np.asarray(list(excluded), dtype=np.int64))
    if excl.size and (excl[0] < 0 or excl[-1] >= n_total):
        raise ConfigError("excluded", f"{excl[0]}..{excl[-1]}", f"positions in [0, {n_total - 1}]")
    included = np.setdiff1d(np.arange(n_total, dtype=np.int64), excl, assume_unique=True)
    n_mols = int(included.size)
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ConfigError("test_fraction", test_fraction, "a number in [0, 1)")
    n_test = int(float(test_fraction) * n_mols)
    if not 0 <= int(n_train) <= n_mols - n_test:
        raise ConfigError("n_train", n_train, f"an integer in [0, {n_mols - n_test}] for {n_mols} molecules")
    n_valid = n_mols - int(n_train) - n_test
    perm = np.random.RandomState(int(seed)).permutation(n_mols)
    cut1, cut2 = int(n_train), int(n_train) + n_valid
    return {"train": included[perm[:cut1]], "valid": included[perm[cut1:cut2]], "test": included[perm[cut2:]]}


def load_qm9(
    source: str | os.PathLike[str],
    exclude: str | os.PathLike[str] | None = None,
    split: str = "all",
    seed: int = 0,
    n_train: int = 100_000,
    n_total: int | None = None,
) -> list[QM9Molecule]:
    """Molecules of one split, in ascending GDB index (the order upstream's loader produces).

    Args:
        source: ``dsgdb9nsd.xyz.tar.bz2`` or a directory of ``dsgdb9nsd_*.xyz``.
        exclude: ``uncharacterized.txt``; None keeps every molecule (then the split is not EDM's).
        split: ``train``, ``valid``, ``test`` or ``all`` (every non-excluded molecule).
        seed: permutation seed (EDM: 0).
        n_train: training-set size (EDM: 100,000).
        n_total: molecules the split is defined on (default: the release's 133,885). The source must
            hold exactly GDB indices ``1..n_total``, because a split of a subset would not be EDM's.
    """
    if split not in SPLITS:
        raise ConfigError("split", split, SPLITS)
    excluded = read_exclusion_list(exclude) if exclude is not None else []
    total = QM9_NUM_MOLECULES if n_total is None else int(n_total)
    if split != "all" and exclude is not None and total == QM9_NUM_MOLECULES \
            and len(set(excluded)) != QM9_NUM_UNCHARACTERIZED:
        warnings.warn(f"{exclude}: {len(set(excluded))} excluded molecules, the release lists "
                      f"{QM9_NUM_UNCHARACTERIZED}; the split will differ from EDM's", stacklevel=2)
    keep: set[int] | None = None  # GDB indices to return; None = all but the excluded
    if split != "all":
        positions = qm9_split_indices(total, [i - 1 for i in excluded if i <= total], seed, n_train)[split]
        keep = set((positions + 1).tolist())
    drop = set(excluded)

    molecules: list[QM9Molecule] = []
    seen: set[int] = set()
    for name, index, data in _iter_members(source):
        # Files whose name gives the index are parsed only when kept: parsing is the slow part.
        if index is not None and (index in drop or (keep is not None and index not in keep)):
            seen.add(index)
            continue
        mol = _parse_member(name, data)
        if mol.index in seen:
            raise DataFormatError(name, 2, f"GDB index {mol.index} appears twice in {source}")
        seen.add(mol.index)
        if mol.index not in drop and (keep is None or mol.index in keep):
            molecules.append(mol)
    if keep is not None and seen != set(range(1, total + 1)):
        raise DataFormatError(
            str(source), None, f"the split needs GDB indices 1..{total} exactly; found {len(seen)} molecules "
            f"(indices {min(seen, default=0)}..{max(seen, default=0)}); pass n_total for a smaller set"
        )
    molecules.sort(key=lambda m: m.index)
    return molecules


def node_count_histogram(molecules: Iterable[QM9Molecule]) -> dict[int, int]:
    """``{atom count: number of molecules}``, ascending in atom count.

    On EDM's training split this reproduces ``dataset_info['n_nodes']`` (sums to 100,000); the
    upstream dict lists the same counts in another order.
    """
    counts: dict[int, int] = {}
    for mol in molecules:
        counts[mol.num_atoms] = counts.get(mol.num_atoms, 0) + 1
    return dict(sorted(counts.items()))


def download_qm9(dest: str | os.PathLike[str], include_atomref: bool = False) -> dict[str, Path]:
    """Download the release files from figshare (``FIGSHARE_URLS``) into ``dest``; needs network.

    Existing files are kept. Each file is written to ``<name>.part`` and renamed when complete, so an
    interrupted download never leaves a truncated file under the final name. The archive is ~86 MB.
    Returns ``{file name: path}``.
    """
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in FIGSHARE_URLS if include_atomref or n != "atomref.txt"]
    paths: dict[str, Path] = {}
    for name in names:
        target = out / name
        if not target.exists():
            part = target.with_name(target.name + ".part")
            urllib.request.urlretrieve(FIGSHARE_URLS[name], part)
            part.replace(target)
        paths[name] = target
    return paths
