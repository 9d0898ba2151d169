"""Run a function on gloo ranks in fresh processes, as torchrun would, and check that each rank's
process group is really gone after ``shutdown``.

Rendezvous is a FileStore in the test's directory: no TCP port is picked and released first, so
none can be taken by another process before rank 0 binds it, and no store server thread exists.
Each rank leaves the group in ``finally``; then it checks that torch's group threads have exited.
Threads that outlive ``destroy_process_group`` mean something still references the group; they
run into interpreter shutdown, where a worker thread that drops a finished collective's Python
tensor aborts the rank ("terminate called without an active exception", SIGABRT).
"""

from __future__ import annotations

import faulthandler
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from elign.engine.distributed import init_distributed, shutdown

# Thread names torch gives a gloo group's threads: the backend's workers, gloo's socket loop, and
# the TCPStore server (TCP rendezvous only).
GROUP_THREADS = frozenset({"pt_gloo_runloop", "gloo_tcp_loop", "pt_tcpstore_uv"})
COLLECTIVE_TIMEOUT = timedelta(seconds=180)  # rendezvous and each collective; a lost peer errors out
THREAD_EXIT_TIMEOUT_S = 30.0  # destroy joins the threads; this only bounds the wait for /proc to agree
JOIN_TIMEOUT_S = 480.0  # the whole run, start-up included, on a loaded two-core machine


def group_threads() -> list[str] | None:
    """Names of this process's live gloo group threads; None where /proc is unavailable."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except (FileNotFoundError, ProcessLookupError):  # exited while listing
            continue
    return sorted(n for n in names if n in GROUP_THREADS)


def _wait_group_threads_gone(rank: int, during: list[str] | None) -> None:
    if during is None:  # no /proc: nothing to check
        return
    if not during:
        raise RuntimeError(f"rank {rank}: none of {sorted(GROUP_THREADS)} ran while the group was up; "
                           "torch renamed its threads, update GROUP_THREADS")
    deadline = time.monotonic() + THREAD_EXIT_TIMEOUT_S
    while (left := group_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        raise RuntimeError(f"rank {rank}: {left} still running after shutdown: something still references "
                           "the process group, so its threads would run into interpreter shutdown")


def _rank_main(rank: int, fn: Callable[..., Any], args: tuple[Any, ...], world_size: int, workdir: str) -> None:
    faulthandler.enable()  # a native abort still prints each thread's Python stack to stderr
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    info = init_distributed("cpu", init_method=f"file://{workdir}/rendezvous", timeout=COLLECTIVE_TIMEOUT)
    try:
        result = fn(info, *args)
        during = group_threads()
    finally:
        shutdown(info)
    _wait_group_threads_gone(rank, during)
    torch.save(result, Path(workdir) / f"rank{rank}.pt")


def run_ranks(fn: Callable[..., Any], workdir: Path, *args: Any, world_size: int = 2) -> list[Any]:
    """``fn(info: DistInfo, *args)`` on each of ``world_size`` gloo ranks (spawned processes);
    returns each rank's result, in rank order. ``fn`` must be a module-level function and its
    result loadable with ``torch.load(weights_only=True)``. A rank's exception or signal is raised
    here (torch.multiprocessing's ProcessRaisedException / ProcessExitedException)."""
    workdir.mkdir(parents=True)  # fresh: a FileStore file left by an earlier run would be joined
    context = mp.start_processes(_rank_main, args=(fn, args, world_size, str(workdir)), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
            for p in context.processes:
                p.kill()
                p.join(10)
            raise TimeoutError(f"ranks {alive} still running after {JOIN_TIMEOUT_S:.0f} s")
    return [torch.load(workdir / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]

