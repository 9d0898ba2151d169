#!/usr/bin/env python
"""Build the embedded QM9 sample shipped in ``elign/data/qm9_sample/`` (loaded by ``elign.data.sample``).

Steps: draw ``--num-molecules`` lines of the QM9 SMILES file (``numpy.random.default_rng(seed).choice``
without replacement, sorted), build each geometry with the project's own code (ETKDG -> MMFF ->
GFN2-xTB to 0.05 eV/Å, see ``elign.data.sample_build``), keep the molecules whose relaxed geometry is
EDM-stable and whose SMILES round-trips, split the kept ones 80/10/10 with the same seed and write
``qm9_sample.npz``, ``smiles.txt``, ``source_smiles.txt`` and ``README.md``.

Why some molecules are dropped: EDM's bond-length tables cannot express bonds whose length is set by
conjugation (aromatic C-C at ~1.39 Å sits on the C=C threshold, amide C-N falls under the C=N one),
so a perfect geometry of such a molecule is still "unstable" for EDM; shipping it would teach the
model geometries its own metric calls wrong. Failures of the pipeline (ETKDG, xTB, crashed workers)
are counted by reason, printed, and listed in ``source_smiles.txt``; nothing is dropped silently.

Restartable: each finished molecule is appended to ``<out>/.partial_build.jsonl``; rerunning the same
command skips those (``--fresh`` starts over). The file is removed once the outputs are written.

Run as a script (workers are spawned processes, so this must stay behind ``__main__``)::

    .venv/bin/python scripts/build_qm9_sample.py --workers 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing; spawned workers inherit it
    sys.path.insert(0, str(REPO))
# No elign import at module level: spawned workers re-import this file before their initializer sets
# OMP_NUM_THREADS=1, and ``elign.data`` imports torch, whose bundled libgomp.so.1 is the very OpenMP
# runtime tblite then binds to; loaded that early it would run xTB with one thread per core.

# CI checks the repository out next to ``shared/``; ELIGN_QM9_SMILES overrides (as in the chem tests).
DEFAULT_SMILES = Path(os.environ.get("ELIGN_QM9_SMILES", REPO.parent / "shared" / "data" / "qm9_smiles.txt"))
DEFAULT_OUT = REPO / "elign" / "data" / "qm9_sample"
CHECKPOINT = ".partial_build.jsonl"
XTB_FMAX = 0.05  # eV/Å, the relaxation threshold of elign.chem.geometry
TRAIN_FRACTION, VALID_FRACTION = 0.8, 0.1  # test gets the rest
FAILURES = ("embed_failed", "not_converged", "error", "worker_crashed")  # pipeline failures, not filters


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smiles", type=Path, default=DEFAULT_SMILES, help="one SMILES per line (default: %(default)s)")
    p.add_argument("--num-molecules", type=int, default=3000, help="SMILES to draw before filtering")
    p.add_argument("--seed", type=int, default=0, help="draw, ETKDG and split seed")
    p.add_argument("--workers", type=int, default=2, help="worker processes (1 OpenMP thread each)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing partial build")
    args = p.parse_args(argv)
    if args.num_molecules < 1:
        p.error("--num-molecules must be positive")
    if args.workers < 1:
        p.error("--workers must be positive")
    return args


def read_smiles(path: Path) -> list[str]:
    """Lines of the SMILES file (first token of each); every line must hold one, so indices = lines."""
    if not path.is_file():
        raise SystemExit(f"SMILES file not found: {path} (pass --smiles PATH or set ELIGN_QM9_SMILES)")
    lines = path.read_text(encoding="utf-8").splitlines()
    tokens = [ln.split()[0] if ln.split() else "" for ln in lines]
    blank = [i + 1 for i, t in enumerate(tokens) if not t]
    if blank:
        raise SystemExit(f"{path}:{blank[0]}: empty line ({len(blank)} in total); expected one SMILES per line")
    return tokens


def draw_lines(num_lines: int, num: int, seed: int) -> np.ndarray:
    """Sorted 1-based line numbers of the seeded draw (documented in the README, keep it stable)."""
    if num > num_lines:
        raise SystemExit(f"--num-molecules {num} exceeds the {num_lines} lines of the SMILES file")
    return np.sort(np.random.default_rng(seed).choice(num_lines, size=num, replace=False)) + 1


def split_indices(num: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded 80/10/10 split of ``num`` kept molecules as sorted int32 positions into the kept arrays."""
    perm = np.random.default_rng(seed).permutation(num)
    n_train, n_valid = round(TRAIN_FRACTION * num), round(VALID_FRACTION * num)
    parts = {"train": perm[:n_train], "valid": perm[n_train:n_train + n_valid], "test": perm[n_train + n_valid:]}
    return {k: np.sort(v).astype(np.int32) for k, v in parts.items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint(path: Path, header: dict[str, Any], fresh: bool) -> dict[int, dict[str, Any]]:
    """Records of an interrupted build with the same parameters, by line; starts the file if needed."""
    if path.exists() and not fresh:
        rows = path.read_text(encoding="utf-8").splitlines()
        if not rows or json.loads(rows[0]) != header:
            raise SystemExit(f"{path} is a partial build with other parameters; rerun with --fresh to discard it")
        done: dict[int, dict[str, Any]] = {}
        for row in rows[1:]:
            try:
                rec = json.loads(row)
            except json.JSONDecodeError:
                continue  # a line cut by the interruption: that molecule is simply redone
            done[int(rec["line"])] = rec
        return done
    path.write_text(json.dumps(header) + "\n", encoding="utf-8")
    return {}


def _command(args: argparse.Namespace) -> str:
    def rel(p: Path) -> str:
        p = p.resolve()
        return os.path.relpath(p, REPO) if p.is_relative_to(REPO.parent) else str(p)

    return (f"python scripts/build_qm9_sample.py --smiles {rel(args.smiles)} --num-molecules "
            f"{args.num_molecules} --seed {args.seed} --workers {args.workers} --out {rel(args.out)}")


def _detail(rec: dict[str, Any]) -> str:
    """Tab-prefixed one-line failure detail for ``source_smiles.txt`` (empty for filters and kept)."""
    return "\t" + " ".join(rec["detail"].split()) if rec["status"] in FAILURES and rec.get("detail") else ""


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("rdkit", "tblite", "ase", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_npz(path: Path, kept: list[dict[str, Any]], splits: dict[str, np.ndarray]) -> None:
    """Flat ragged layout (positions of all molecules concatenated, ``offsets`` into them): ~40 % of a
    29-atom padded array for QM9's ~18-atom mean. Written to a temporary name, then renamed."""
    from elign.data.sample import FORMAT_VERSION

    counts = np.array([len(r["z"]) for r in kept], dtype=np.int8)
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    arrays = {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int32),
        "positions": np.concatenate([np.asarray(r["positions"]) for r in kept]).astype(np.float32).reshape(-1, 3),
        "atomic_numbers": np.concatenate([np.asarray(r["z"]) for r in kept]).astype(np.int8),
        "num_atoms": counts,
        "offsets": offsets,
        "energy_ev": np.array([r["energy_ev"] for r in kept], dtype=np.float64),
        "source_line": np.array([r["line"] for r in kept], dtype=np.int32),
        **{f"{name}_idx": idx for name, idx in splits.items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(tmp, path)


def write_readme(path: Path, args: argparse.Namespace, stats: dict[str, Any]) -> None:
    """The folder's README: provenance (command, seed, versions, date) and the drop statistics."""
    from elign.data.sample import FORMAT_VERSION, NPZ_NAME, SMILES_NAME, SOURCE_NAME
    from elign.data.sample_build import REASONS

    counts: Counter = stats["counts"]
    drawn, kept = stats["drawn"], counts["kept"]
    rows = "\n".join(f"| `{k}` | {counts[k]} | {REASONS[k]} |" for k in REASONS if counts[k])
    versions = ", ".join(f"{k} {v}" for k, v in stats["versions"].items())
    sizes = ", ".join(f"{k} {len(v)}" for k, v in stats["splits"].items())
    text = f"""# Embedded QM9 sample

{kept} QM9 molecules with all-atom 3D geometries, shipped so that the default configs train and evaluate
without network access. Read it with `elign.data.sample` (`QM9SampleDataset`, `load_qm9_sample`,
`sample_node_histogram`, `sample_smiles`). These are **not** QM9's DFT geometries: each molecule is its
QM9 SMILES embedded with RDKit ETKDGv3, pre-relaxed with MMFF94 and relaxed with GFN2-xTB (tblite,
ASE L-BFGS) to a largest atomic force of {XTB_FMAX} eV/Å (`elign.chem.geometry`).

Built on {stats['date']} with

    {_command(args)}

Source: `{args.smiles.name}` ({stats['num_lines']} lines, sha256 `{stats['sha256']}`). Draw:
`numpy.random.default_rng({args.seed}).choice({stats['num_lines']}, {drawn}, replace=False)`, sorted,
+1 = line number. ETKDG seed {args.seed} (up to 3 seeds). Versions: {versions}.
Build time: {stats['seconds']:.0f} s for the {stats['processed']} molecules computed in the last run
({args.workers} worker processes).

## Counts

Drawn {drawn}, kept {kept}, dropped {drawn - kept} ({100 * (drawn - kept) / drawn:.1f} %; filters
{stats['filtered']}, pipeline failures {stats['failed']}).

| status | molecules | meaning |
|---|---|---|
{rows}

Why molecules are filtered: EDM's bond inference compares distances with fixed single/double/triple
bond-length tables, which cannot express bonds whose length comes from conjugation (aromatic C-C at
~1.39 Å sits on the C=C threshold, amide C-N falls under the C=N threshold, a single bond between
triple bonds looks double). Such a molecule is "unstable" for EDM even at a perfect geometry (EDM's
own QM9 DFT geometries are only ~95 % stable). A few strained small rings also stretch a bond past
the single-bond window. We ship only molecules EDM's metric reads correctly, i.e. EDM-stable with a
SMILES that round-trips through `elign.chem.rdkit_mol.geometry_to_smiles`; `smiles_mismatch` is
mostly a source line without a tag on a stereocentre (the geometry's SMILES then has one, and the
sample's SMILES list must be what the metric produces).

Split (seed {args.seed}, `default_rng(seed).permutation`, 80/10/10 of the kept molecules): {sizes}.

## Files

- `{NPZ_NAME}` (format {FORMAT_VERSION}), flat ragged layout, molecule `i` = rows
  `offsets[i]:offsets[i+1]`: `positions` float32 [atoms, 3] Å (not centred), `atomic_numbers` int8
  [atoms] (RDKit order: heavy atoms, then H), `num_atoms` int8 [M], `offsets` int64 [M+1],
  `energy_ev` float64 [M] (GFN2-xTB total energy, eV), `source_line` int32 [M] (1-based line of the
  SMILES file), `train_idx`/`valid_idx`/`test_idx` int32 (sorted positions into the M molecules).
- `{SMILES_NAME}`: SMILES of the kept molecules, one per line, in `{NPZ_NAME}` order (inferred back from
  the geometry; equal to the source line up to RDKit canonicalisation).
- `{SOURCE_NAME}`: every drawn line before filtering: `line<TAB>smiles<TAB>status`, plus
  `<TAB>detail` for pipeline failures.
"""
    path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Build the sample; returns the process exit code."""
    from elign.data.sample import FORMAT_VERSION, NPZ_NAME, SMILES_NAME, SOURCE_NAME
    from elign.data.sample_build import REASONS, run_jobs

    args = parse_args(argv)
    t0 = time.perf_counter()
    smiles = read_smiles(args.smiles)
    lines = draw_lines(len(smiles), args.num_molecules, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    sha = _sha256(args.smiles)
    header = {"format": FORMAT_VERSION, "sha256": sha, "seed": args.seed,
              "num_molecules": args.num_molecules, "fmax": XTB_FMAX}
    ckpt = args.out / CHECKPOINT
    records = load_checkpoint(ckpt, header, args.fresh)
    # Same header => same draw, so the checkpoint's lines are exactly a subset of ``lines``.
    jobs = [(int(ln), smiles[ln - 1], args.seed, XTB_FMAX) for ln in lines if ln not in records]
    counts = Counter(r["status"] for r in records.values())
    if records:
        print(f"resuming: {len(records)} molecules already done in {ckpt}")

    bar = tqdm(total=len(lines), initial=len(records), unit="mol", desc="QM9 sample", dynamic_ncols=True)
    with open(ckpt, "a", encoding="utf-8") as log, bar:
        def on_result(rec: dict[str, Any]) -> None:
            records[rec["line"]] = rec
            log.write(json.dumps(rec) + "\n")
            log.flush()  # an interruption loses at most the molecules still running
            counts[rec["status"]] += 1
            if rec["status"] in FAILURES:
                bar.write(f"line {rec['line']} {rec['smiles']}: {rec['status']} {rec.get('detail', '')}")
            bar.update(1)
            bar.set_postfix(kept=counts["kept"], filtered=sum(counts[k] for k in ("unstable", "smiles_mismatch",
                            "invalid")), failed=sum(counts[k] for k in FAILURES), refresh=False)

        try:
            run_jobs(jobs, on_result, workers=args.workers)
        except KeyboardInterrupt:
            bar.close()
            print(f"interrupted: {len(records)}/{len(lines)} molecules saved in {ckpt}; rerun the same "
                  "command to resume", file=sys.stderr)
            return 130

    ordered = [records[int(ln)] for ln in lines]
    kept = [r for r in ordered if r["status"] == "kept"]
    if not kept:
        raise SystemExit(f"no molecule was kept out of {len(ordered)}; see {ckpt}")
    splits = split_indices(len(kept), args.seed)
    write_npz(args.out / NPZ_NAME, kept, splits)
    (args.out / SMILES_NAME).write_text("".join(r["out_smiles"] + "\n" for r in kept), encoding="utf-8")
    (args.out / SOURCE_NAME).write_text(
        "".join(f"{r['line']}\t{r['smiles']}\t{r['status']}{_detail(r)}\n" for r in ordered), encoding="utf-8")
    counts = Counter(r["status"] for r in ordered)
    failed = sum(counts[k] for k in FAILURES)
    stats = {"counts": counts, "drawn": len(ordered), "failed": failed,
             "filtered": len(ordered) - counts["kept"] - failed, "splits": splits, "sha256": sha,
             "num_lines": len(smiles), "versions": _versions(), "processed": len(jobs),
             "seconds": time.perf_counter() - t0, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")}
    write_readme(args.out / "README.md", args, stats)
    ckpt.unlink()

    print(f"kept {counts['kept']}/{len(ordered)} ({100 * counts['kept'] / len(ordered):.1f} %) -> {args.out}")
    for status in REASONS:
        if counts[status] and status != "kept":
            print(f"  dropped {counts[status]:5d} {status}: {REASONS[status]}")
    if counts["error"] or counts["worker_crashed"]:
        print(f"WARNING: {counts['error'] + counts['worker_crashed']} molecules hit worker errors; "
              f"details per line in {args.out / SOURCE_NAME} and above", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
