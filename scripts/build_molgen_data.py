#!/usr/bin/env python
"""Build the embedded conformer dataset shipped in ``molgen_grpo/data/qm9_conformers/`` (spec §1.4, §4).

Steps: draw ``--num-molecules`` lines of the QM9 SMILES file (``numpy.random.default_rng(seed).choice``
without replacement, sorted), build each molecule's RDKit ensemble (ETKDGv3 -> MMFF94 -> heavy-atom
symmetry-aware RMS pruning -> at most ``--max-confs`` lowest-energy conformers, see
``molgen_grpo.conformers``), drop failures and duplicate molecules (counted by reason, listed in the
README), split the kept molecules 80/10/10 with the same seed and write 3DMolGen's preprocessing
layout: ``{train,valid,test}.jsonl`` (one conformer per line), per-molecule reference pickles for
``--reference-splits``, ``smiles_to_pickle.json`` and ``README.md``.

One process, one thread: about 0.4 s per molecule, so the default build takes a few minutes and is
not restartable (rerun the command). Run from the repository root::

    .venv/bin/python scripts/build_molgen_data.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import statistics
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from molgen_grpo.conformers import (MAPPING_NAME, REASONS, REFERENCE_DIR, SPLITS, Ensemble,  # noqa: E402
                                    EnsembleSettings, build_ensemble, embed_seed, split_molecules, write_dataset)

# The repository is checked out next to ``shared/``; ELIGN_QM9_SMILES overrides (as build_qm9_sample.py).
DEFAULT_SMILES = Path(os.environ.get("ELIGN_QM9_SMILES", REPO.parent / "shared" / "data" / "qm9_smiles.txt"))
DEFAULT_OUT = REPO / "molgen_grpo" / "data" / "qm9_conformers"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = EnsembleSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smiles", type=Path, default=DEFAULT_SMILES, help="one SMILES per line (default: %(default)s)")
    p.add_argument("--num-molecules", type=int, default=800, help="SMILES to draw before dropping failures")
    p.add_argument("--seed", type=int, default=0, help="draw, ETKDG and split seed")
    p.add_argument("--num-embed", type=int, default=defaults.num_embed, help="ETKDGv3 conformers per molecule")
    p.add_argument("--max-attempts", type=int, default=defaults.max_attempts,
                   help="ETKDG tries per requested conformer (0 = RDKit's 10 x atoms)")
    p.add_argument("--prune-rms", type=float, default=defaults.prune_rms,
                   help="heavy-atom symmetry-aware RMSD threshold of the pruning, Å")
    p.add_argument("--max-confs", type=int, default=defaults.max_confs, help="conformers kept per molecule")
    p.add_argument("--precision", type=int, default=4, help="decimals per coordinate in the enriched strings")
    p.add_argument("--reference-splits", nargs="*", default=["valid", "test"], choices=SPLITS,
                   help="splits that get reference pickles and mapping entries (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    if args.num_molecules < 1:
        p.error("--num-molecules must be positive")
    try:
        args.settings = EnsembleSettings(args.num_embed, args.max_attempts, args.prune_rms, args.max_confs)
    except ValueError as err:
        p.error(str(err))
    return args


def read_smiles(path: Path) -> list[str]:
    """First token of each line; every line must hold one, so indices are line numbers - 1."""
    if not path.is_file():
        raise SystemExit(f"SMILES file not found: {path} (pass --smiles PATH or set ELIGN_QM9_SMILES)")
    tokens = [ln.split()[0] if ln.split() else "" for ln in path.read_text(encoding="utf-8").splitlines()]
    blank = [i + 1 for i, t in enumerate(tokens) if not t]
    if blank:
        raise SystemExit(f"{path}:{blank[0]}: empty line ({len(blank)} in total); expected one SMILES per line")
    return tokens


def draw_lines(num_lines: int, num: int, seed: int) -> list[int]:
    """Sorted 1-based line numbers of the seeded draw (documented in the README, keep it stable)."""
    if num > num_lines:
        raise SystemExit(f"--num-molecules {num} exceeds the {num_lines} lines of the SMILES file")
    return [int(i) + 1 for i in np.sort(np.random.default_rng(seed).choice(num_lines, size=num, replace=False))]


def build_all(smiles: list[str], lines: list[int], seed: int, settings: EnsembleSettings,
              progress: bool = True) -> list[Ensemble]:
    """Every drawn line's ensemble, in line order; a repeat of an earlier canonical SMILES is marked
    ``duplicate`` (it would leak across splits and make the mapping ambiguous)."""
    results: list[Ensemble] = []
    seen: dict[str, int] = {}
    for line in tqdm(lines, unit="mol", desc="conformers", dynamic_ncols=True, disable=not progress):
        result = build_ensemble(smiles[line - 1], line, seed, settings)
        if result.status == "kept" and result.smiles in seen:
            result.status, result.detail = "duplicate", f"line {seen[result.smiles]}"
            result.conformers = []
        elif result.status == "kept":
            seen[result.smiles] = line
        results.append(result)
    return results


def _command(args: argparse.Namespace) -> str:
    def rel(p: Path) -> str:
        p = p.resolve()
        return os.path.relpath(p, REPO) if p.is_relative_to(REPO.parent) else str(p)

    s = args.settings
    return (f"python scripts/build_molgen_data.py --smiles {rel(args.smiles)} --num-molecules {args.num_molecules} "
            f"--seed {args.seed} --num-embed {s.num_embed} --max-attempts {s.max_attempts} --prune-rms {s.prune_rms} "
            f"--max-confs {s.max_confs} --precision {args.precision} --reference-splits "
            f"{' '.join(args.reference_splits)} --out {rel(args.out)}")


def _versions() -> str:
    out = {"python": sys.version.split()[0]}
    for pkg in ("rdkit", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return ", ".join(f"{k} {v}" for k, v in out.items())


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_readme(path: Path, args: argparse.Namespace, results: list[Ensemble], counts: dict[str, Any],
                 stats: dict[str, Any]) -> None:
    """Provenance (command, draw, seeds, versions, time), counts, method and the dropped molecules."""
    s = args.settings
    status = Counter(r.status for r in results)
    kept = [r for r in results if r.status == "kept"]
    sizes = [len(r.conformers) for r in kept]
    rows = "\n".join(f"| `{k}` | {status[k]} | {REASONS[k]} |" for k in REASONS if status[k])
    split_rows = "\n".join(f"| {k} | {v['molecules']} | {v['conformers']} | {v['references']} |" for k, v in counts.items())
    histogram = Counter("1" if n == 1 else "2-5" if n <= 5 else "6-10" if n <= 10 else f"11-{s.max_confs}" for n in sizes)
    bins = ", ".join(f"{k}: {histogram[k]}" for k in ("1", "2-5", "6-10", f"11-{s.max_confs}") if histogram[k])
    dropped = "\n".join(f"- `{r.status}`: line {r.line} `{r.source_smiles}`" + (f" ({r.detail})" if r.detail else "")
                        for reason in REASONS for r in results if r.status == reason != "kept") or "none"
    text = f"""# QM9 conformer ensembles (RDKit) in 3DMolGen's data layout

{len(kept)} QM9 molecules with RDKit conformer ensembles, the offline CPU stand-in for GEOM-Drugs (spec
§1.4, §4): pretraining JSONL for `molgen_grpo.packing.PackedJsonl` and reference conformers for GRPO
rewards and COV/MAT. These are **not** GEOM's CREST ensembles (see Method).

Built on {stats['date']} in {stats['seconds']:.0f} s (one process, one thread) with

    {_command(args)}

Source: `{args.smiles.name}` ({stats['num_lines']} lines, sha256 `{stats['sha256']}`). Draw:
`numpy.random.default_rng({args.seed}).choice({stats['num_lines']}, {len(results)}, replace=False)`, sorted,
+1 = line number. Versions: {_versions()}.

## Method

- Stereo: a line that leaves stereo unassigned ({sum(r.stereo_fixed for r in results)} of {len(results)}) gets one
  stereoisomer: `EnumerateStereoisomers(onlyUnassigned=True)` in canonical-SMILES order, the first that
  embeds; its isomeric SMILES is the molecule's `canonical_smiles`.
- Embedding: RDKit ETKDGv3, {s.num_embed} conformers, `maxIterations={s.max_attempts}` tries per conformer,
  `randomSeed = 1 + (seed * 1000003 + line) % (2**31 - 2)` (e.g. line 1, seed {args.seed}: {embed_seed(args.seed, 1)};
  never 0, with which RDKit embeds identical conformers), no pruning while embedding.
- Relaxation: MMFF94 (`MMFFOptimizeMoleculeConfs`, 2000 steps); unconverged conformers and conformers
  whose 3D stereo changed are dropped.
- Pruning: energy order; a conformer is kept if its heavy-atom, symmetry-aware RMSD
  (`rdMolAlign.GetBestRMS`) to every kept one is >= {s.prune_rms} Å; then the {s.max_confs} lowest. Mirror-image
  conformers of an achiral molecule are distinct (RMSD is taken without reflection), as in GEOM.
- Not GEOM: GEOM-Drugs ensembles come from CREST (GFN2-xTB metadynamics), whose CREGEN step merges
  duplicates by energy, RMSD and rotational constants within an energy window (by default 6 kcal/mol,
  0.125 Å); 3DMolGen keeps the 30 lowest-energy of them without further pruning. A 0.5 Å cut on MMFF
  minima keeps fewer, more distinct conformers (QM9 molecules are small and rigid).

## Counts

Drawn {len(results)}, kept {len(kept)}, dropped {len(results) - len(kept)}.

| status | molecules | meaning |
|---|---|---|
{rows}

| split | molecules | conformers (JSONL lines) | reference pickles |
|---|---|---|---|
{split_rows}

Conformers per kept molecule: mean {statistics.mean(sizes):.2f}, median {statistics.median(sizes):g}, max
{max(sizes)}; {bins}. Split: seed {args.seed}, `default_rng(seed).permutation` of the kept molecules
(in line order), 80/10/10 by molecule. Folder size: {stats['bytes'] / 1e6:.2f} MB.

## Files

- `train.jsonl`, `valid.jsonl`, `test.jsonl`: one conformer per line,
  `{{"canonical_smiles": <isomeric canonical SMILES, H-free>, "embedded_smiles": <enriched SMILES>}}`
  (`molgen_grpo.text.encode`, precision {args.precision}); molecules in line order, conformers lowest energy first.
- `{REFERENCE_DIR}/<split>/line<NNNNNN>.pickle` ({', '.join(args.reference_splits) or 'no splits'}): a list of RDKit
  molecules with hydrogens, one conformer each, lowest energy first, properties
  `mmff94_energy_kcal_mol` and `source_line`; read them with `molgen_grpo.pickles.load_pickle`.
- `{MAPPING_NAME}`: canonical SMILES -> reference pickle path, relative to this folder.

## Dropped molecules

{dropped}
"""
    path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Build the dataset; returns the process exit code."""
    args = parse_args(argv)
    start = time.perf_counter()
    smiles = read_smiles(args.smiles)
    lines = draw_lines(len(smiles), args.num_molecules, args.seed)
    results = build_all(smiles, lines, args.seed, args.settings)
    kept = [r for r in results if r.status == "kept"]
    if not kept:
        raise SystemExit(f"no molecule was kept out of {len(results)}: {Counter(r.status for r in results)}")
    splits = split_molecules(len(kept), args.seed)
    counts = write_dataset(args.out, kept, splits, args.reference_splits, args.precision)
    stats = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "num_lines": len(smiles),
             "sha256": hashlib.sha256(args.smiles.read_bytes()).hexdigest(), "seconds": time.perf_counter() - start}
    stats["bytes"] = _folder_size(args.out)  # before the README, which is a few kB
    write_readme(args.out / "README.md", args, results, counts, stats)
    status = Counter(r.status for r in results)
    print(f"kept {len(kept)}/{len(results)} molecules in {stats['seconds']:.0f} s -> {args.out}")
    for reason in REASONS:
        if status[reason] and reason != "kept":
            print(f"  dropped {status[reason]:4d} {reason}: {REASONS[reason]}")
    for split, c in counts.items():
        print(f"  {split}: {c['molecules']} molecules, {c['conformers']} conformers, {c['references']} references")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
