"""A persistent pool of single-threaded worker processes for the CPU force fields (xTB, MMFF).

Why processes: RDKit holds the GIL for a whole calculation, so threads would not scale, and a
native crash (segfault, ``exit()`` inside a C/Fortran library) kills only a worker, which is
reported per molecule (``worker_crashed``) instead of ending the training run. Why "spawn": the parent usually runs torch (OpenMP thread pools, maybe CUDA); forking such a
process can deadlock or duplicate thread pools, a fresh interpreter cannot. Why one thread per
worker: ``num_workers`` workers should use ``num_workers`` cores, and OpenMP threads inside
tblite buy nothing on QM9-size molecules while oversubscribed spinning threads can cost 50x
(measured: 9 ms vs 480 ms per molecule on a busy 2-core machine). ``OMP_NUM_THREADS=1`` (and the
BLAS equivalents) must be in the worker's environment *when it starts*: libgomp reads it once,
when it is loaded, and a spawn child loads it early (torch bundles libgomp, and the child
re-imports the parent's ``__main__``, which usually imports torch) - before any initializer runs.
So the variables are put into the parent's environment while the workers are being started.

The functions sent to the workers live in :mod:`elign.forcefield.kernels`, which imports neither
torch nor the rest of the package. Start-up still costs what re-importing the parent's
``__main__`` costs (about 1-3 s), once: the pool persists between calls.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Sequence

logger = logging.getLogger(__name__)

#: Environment variables that cap the thread pools of OpenMP / BLAS libraries inside a worker.
_SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OMP_MAX_ACTIVE_LEVELS": "1",
}

#: Chunks per worker: several small tasks per worker balance uneven molecule sizes while keeping
#: the per-task overhead (pickling, scheduling; ~0.1 ms) small next to a single point (~ms).
CHUNKS_PER_WORKER = 4


#: Seconds a starting worker waits for the others (a worker that cannot start within this time
#: breaks the pool with an error instead of hanging the caller).
_START_TIMEOUT_S = 300.0


@contextlib.contextmanager
def _single_thread_environment() -> Iterator[None]:
    """Set :data:`_SINGLE_THREAD_ENV` in ``os.environ`` for the duration (children started now
    inherit it), then restore the previous values."""
    saved = {key: os.environ.get(key) for key in _SINGLE_THREAD_ENV}
    os.environ.update(_SINGLE_THREAD_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _init_worker(barrier: Any, preload: tuple[str, ...]) -> None:
    """Runs first in every worker: import the backend library, then wait until every worker of
    the pool has got this far."""
    for module in preload:
        importlib.import_module(module)
    barrier.wait(_START_TIMEOUT_S)


def _ready() -> bool:
    """No-op task used to start the workers and wait until they are all up."""
    return True


def split_chunks(num_items: int, num_chunks: int) -> list[range]:
    """Split ``range(num_items)`` into at most ``num_chunks`` contiguous, near-equal ranges."""
    num_chunks = max(1, min(num_chunks, num_items))
    base, extra = divmod(num_items, num_chunks)
    out, start = [], 0
    for c in range(num_chunks):
        stop = start + base + (1 if c < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


class WorkerPool:
    """``num_workers`` persistent spawn-started processes (started on first use).

    ``map_chunks(fn, config, items, on_crash)`` calls ``fn(config, chunk)`` for contiguous chunks
    of ``items`` in the workers and returns the concatenated per-item results in order. If a
    worker process dies (e.g. a segfault in a Fortran library), the pool is rebuilt and every
    item of the chunks that had not returned gets ``on_crash`` as its result.
    """

    def __init__(self, num_workers: int, preload: tuple[str, ...] = ()) -> None:
        if num_workers < 2:
            raise ValueError(f"WorkerPool needs >= 2 workers, got {num_workers}")
        self.num_workers = num_workers
        self.preload = preload
        self._executor: ProcessPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None

    def _ensure_started(self) -> ProcessPoolExecutor:
        if self._executor is None:
            if multiprocessing.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
                # Inside a joblib (loky) sweep job the start method is "loky", which spawn children
                # are told to use and cannot find ("cannot find context for 'loky'").
                multiprocessing.set_start_method("spawn", force=True)
            ctx = multiprocessing.get_context("spawn")
            executor = ProcessPoolExecutor(
                max_workers=self.num_workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(ctx.Barrier(self.num_workers), self.preload),
            )
            # Shut the workers down when this pool is garbage-collected or at interpreter exit,
            # even if the owner never calls close().
            self._finalizer = weakref.finalize(self, _shutdown, executor)
            # The executor starts one process per submit while none is idle: num_workers no-op
            # tasks start them all, and the barrier in _init_worker makes each wait for the
            # others, so when these return every worker is up. Without this, workers still
            # booting (a spawn child re-imports the parent's __main__ module: seconds) would
            # pick up chunks late and stall the first calls.
            try:
                with _single_thread_environment():
                    futures = [executor.submit(_ready) for _ in range(self.num_workers)]
                for future in futures:
                    future.result()
            except BrokenProcessPool as err:
                self.close()
                raise RuntimeError(
                    f"could not start {self.num_workers} force-field worker processes "
                    f"(preloading {self.preload}): {err}"
                ) from err
            self._executor = executor
        return self._executor

    def map_chunks(
        self,
        fn: Callable[[dict[str, Any], list[Any]], list[Any]],
        config: dict[str, Any],
        items: Sequence[Any],
        on_crash: Any,
    ) -> list[Any]:
        """Run ``fn(config, chunk)`` over chunks of ``items`` in the workers (see class doc)."""
        if not items:
            return []
        executor = self._ensure_started()
        chunks = split_chunks(len(items), self.num_workers * CHUNKS_PER_WORKER)
        futures: list[Future] = [
            executor.submit(fn, config, [items[k] for k in chunk]) for chunk in chunks
        ]
        results: list[Any] = []
        crashed = False
        for chunk, future in zip(chunks, futures):
            try:
                out = future.result()
            except BrokenProcessPool:
                crashed = True
                out = [on_crash] * len(chunk)
            if len(out) != len(chunk):
                raise RuntimeError(f"worker returned {len(out)} results for {len(chunk)} items")
            results.extend(out)
        if crashed:
            logger.warning("a force-field worker process died; restarting the pool")
            self.close()
        return results

    def close(self) -> None:
        """Stop the workers (idempotent); the next ``map_chunks`` starts new ones."""
        if self._finalizer is not None:
            self._finalizer()
        self._executor = None
        self._finalizer = None


def _shutdown(executor: ProcessPoolExecutor) -> None:
    executor.shutdown(wait=True, cancel_futures=True)
