"""Per-molecule work and the worker pool behind ``scripts/build_qm9_sample.py``.

This lives in the package (not in the script) because the workers are *spawned* processes: they
unpickle :func:`process_smiles` by module name, and ``elign.data.sample_build`` is importable from
any worker, whereas a script module is only importable when run as ``__main__``.

One molecule (:func:`process_smiles`): SMILES -> :func:`elign.chem.geometry.embed_smiles` (ETKDG,
MMFF, GFN2-xTB L-BFGS to ``fmax``) -> one more xTB single point for the energy and the final force
-> EDM stability and the SMILES round trip. The result is a plain JSON-able dict (a *record*) so that
the build can append it to its checkpoint file as is.

Record keys: ``line`` (1-based line in the SMILES file), ``smiles`` (the source line), ``status``
(``"kept"`` or the drop reason, see :data:`REASONS`), ``detail`` (free text for errors),
``z`` (atomic numbers), ``positions`` (``[N, 3]`` Å as nested lists), ``energy_ev``, ``max_force``
(eV/Å), ``xtb_steps``, ``out_smiles`` (SMILES inferred back from the geometry, ``None`` if invalid).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any

import numpy as np

from elign.chem.geometry import _init_worker as _geometry_init_worker

__all__ = ["REASONS", "Job", "canonical_smiles", "process_smiles", "run_jobs"]

#: Every status a record can have. The first group are filters (the chemistry works, the molecule is
#: not representable by EDM's bond tables), the second are failures of the pipeline.
REASONS: dict[str, str] = {
    "kept": "stable and the SMILES round-trips",
    "unstable": "relaxed geometry is not EDM-stable (bond-length tables give a wrong bond order)",
    "smiles_mismatch": "EDM-stable, but the SMILES from the geometry differs from the source (mostly source "
                       "lines that leave a stereocentre unspecified, which a 3D geometry always fixes)",
    "invalid": "EDM-stable, but RDKit cannot sanitise the molecule built from the inferred bonds",
    "embed_failed": "ETKDG found no conformer within the allowed seeds",
    "not_converged": "GFN2-xTB relaxation hit its step cap above the force threshold",
    "error": "an exception in the worker (type and message in 'detail')",
    "worker_crashed": "the worker process died (e.g. a segfault in a native library)",
}

#: ``(line, smiles, seed, fmax)``: what one worker call needs.
Job = tuple[int, str, int, float]

_NUMBERS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}


def canonical_smiles(smiles: str) -> str | None:
    """RDKit's canonical isomeric SMILES (``None`` if unparsable); tolerates RDKit version changes."""
    from rdkit import Chem, rdBase

    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
    return None if mol is None else Chem.MolToSmiles(mol)


def _energy_and_fmax(symbols: tuple[str, ...], positions: np.ndarray) -> tuple[float, float]:
    """GFN2-xTB energy (eV) and largest atomic force norm (eV/Å) at a fixed geometry.

    ``relax_xtb`` returns positions only; one extra single point (~1/25 of a relaxation) gives the
    energy and lets us verify convergence instead of trusting the step count.
    """
    from ase import Atoms
    from tblite.ase import TBLite

    atoms = Atoms(list(symbols), positions=positions)
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    energy = float(atoms.get_potential_energy())
    fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    return energy, fmax


def process_smiles(job: Job) -> dict[str, Any]:
    """Build and judge one molecule; never raises (every outcome is a record with a status)."""
    line, smiles, seed, fmax = job
    rec: dict[str, Any] = {"line": line, "smiles": smiles, "status": "error", "detail": ""}
    try:
        from elign.chem.geometry import EmbeddingError, embed_smiles
        from elign.chem.rdkit_mol import geometry_to_smiles
        from elign.chem.stability import check_stability

        try:
            mol = embed_smiles(smiles, seed=seed, relax="xtb", xtb_fmax=fmax)
        except EmbeddingError as err:
            rec.update(status="embed_failed", detail=str(err))
            return rec
        energy, final_fmax = _energy_and_fmax(mol.symbols, mol.positions)
        out = geometry_to_smiles(mol.positions, mol.symbols)
        stable = check_stability(mol.positions, mol.symbols).molecule_stable
        rec.update(
            z=[_NUMBERS[s] for s in mol.symbols],
            positions=mol.positions.tolist(),
            energy_ev=energy,
            max_force=final_fmax,
            xtb_steps=mol.xtb_steps,
            out_smiles=out,
        )
        # Small tolerance: the single point repeats the optimiser's last force evaluation.
        if final_fmax > fmax * 1.001:
            rec["status"] = "not_converged"
        elif not stable:  # checked before validity: an unstable molecule is often invalid too
            rec["status"] = "unstable"
        elif out is None:
            rec["status"] = "invalid"
        elif out != smiles and out != canonical_smiles(smiles):
            rec["status"] = "smiles_mismatch"
        else:
            rec["status"] = "kept"
    except Exception as err:  # noqa: BLE001 - recorded with its type, counted and reported by the build
        rec.update(status="error", detail=f"{type(err).__name__}: {err}"[:300])
    return rec


def _new_pool(workers: int) -> ProcessPoolExecutor:
    """Spawned workers with ``OMP_NUM_THREADS=1`` (multi-threaded xTB on ~17-atom molecules is slower).

    "spawn", not fork: a fork would inherit the parent's initialised OpenMP runtime and thread count.
    The initializer must not live in ``elign.data``: the child imports the initializer's module to
    unpickle it *before* calling it, ``elign.data`` imports torch, and torch's bundled
    ``libgomp.so.1`` (the runtime tblite then binds to) reads ``OMP_NUM_THREADS`` when it loads.
    ``elign.chem.geometry`` imports no torch (checked by ``test_workers_run_single_threaded``).
    """
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_geometry_init_worker, initargs=(1,)
    )


def _crash_record(job: Job) -> dict[str, Any]:
    return {"line": job[0], "smiles": job[1], "status": "worker_crashed",
            "detail": "worker process died while this molecule ran alone"}


def run_jobs(
    jobs: Iterable[Job],
    on_result: Callable[[dict[str, Any]], None],
    workers: int = 1,
    worker_fn: Callable[[Job], dict[str, Any]] = process_smiles,
) -> None:
    """Run ``worker_fn`` over ``jobs`` in ``workers`` spawned processes, calling ``on_result`` per record.

    Records arrive in completion order (the caller sorts). At most ``2 * workers`` jobs are in flight,
    so a record is handed over (and can be checkpointed) as soon as it is done. If a worker process
    dies, every in-flight job fails with ``BrokenProcessPool`` and we cannot tell which one killed it:
    those jobs are re-run one at a time in a fresh pool, and only the one that breaks the pool while
    running alone is recorded as ``worker_crashed``; the rest get their real result.
    """
    queue: deque[Job] = deque(jobs)
    suspects: deque[Job] = deque()
    window = 2 * max(1, workers)
    pool = _new_pool(workers)
    inflight: dict[Future, Job] = {}
    try:
        while queue or suspects or inflight:
            if suspects and not inflight:
                job = suspects.popleft()
                try:
                    rec = pool.submit(worker_fn, job).result()
                except BrokenProcessPool:
                    rec = _crash_record(job)
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = _new_pool(workers)
                on_result(rec)
                continue
            while queue and not suspects and len(inflight) < window:
                job = queue.popleft()
                inflight[pool.submit(worker_fn, job)] = job
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                # The whole pool is gone: collect every in-flight job, keep real results.
                wait(inflight)
                for fut, job in inflight.items():
                    if isinstance(fut.exception(), BrokenProcessPool):
                        suspects.append(job)
                    else:
                        on_result(fut.result())
                inflight.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = _new_pool(workers)
                continue
            for fut in done:
                inflight.pop(fut)
                on_result(fut.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
