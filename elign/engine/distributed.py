"""Process-group set-up for ``torchrun`` and the few collectives the trainer needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from elign.engine.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")

if dist.is_available():
    # torch.distributed.nn.functional binds ``group=group.WORLD`` as default arguments when it is
    # first imported, and DistributedDataParallel's first construction imports it (via torch._dynamo).
    # Imported after init_process_group, those defaults hold the default process group for the life
    # of the interpreter: destroy_process_group then frees nothing, gloo's worker threads run into
    # interpreter shutdown, and one that drops the last reference to a finished collective's Python
    # tensor there aborts the rank ("terminate called without an active exception"). Imported here,
    # before any group exists, the defaults are None.
    import torch.distributed.nn  # noqa: F401


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def check_device(device: str, local_rank: int = 0) -> None:
    """Raise :class:`ConfigError` (key ``device``) unless ``device`` is usable on this machine by
    the process with ``local_rank``: a GPU that is not there must not become a CUDA traceback."""
    if device not in DEVICES:
        raise ConfigError("device", device, DEVICES)
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError("device", device, "auto or cpu (this machine has no usable CUDA device)")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError("device", device, f"auto or cpu, or at most {torch.cuda.device_count()} processes per "
                                            f"node (LOCAL_RANK={local_rank} has no GPU)")


def init_distributed(device: str = "auto", init_method: str | None = None,
                     timeout: timedelta | None = None) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (RANK/WORLD_SIZE set); otherwise a
    single process. gloo on CPU, nccl on GPU. ``device``: "auto", "cpu" or "cuda" (checked by
    :func:`check_device`).

    ``init_method``: rendezvous URL; None is torchrun's ``env://`` (MASTER_ADDR/MASTER_PORT).
    ``timeout``: how long a collective may wait for the other ranks; None is torch's default."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_device(device, local_rank)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method=init_method,
                                rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def reduce_mean(metrics: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each scalar over ranks. Keys missing on a rank (e.g. a failure reason that did not
    occur there) count as 0 on that rank."""
    if not info.enabled:
        return metrics
    key_sets: list[Any] = [None] * info.world_size
    dist.all_gather_object(key_sets, sorted(metrics))
    keys = sorted(set().union(*key_sets))
    backend_device = info.device if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([float(metrics.get(k, 0.0)) for k in keys], dtype=torch.float64, device=backend_device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values /= info.world_size
    return dict(zip(keys, values.tolist()))


def average_gradients(params: list[torch.Tensor], info: DistInfo) -> None:
    """Replace each ``.grad`` by its mean over ranks (what DistributedDataParallel does in backward),
    for gradients set outside a DDP forward. One flat all-reduce."""
    if not info.enabled:
        return
    grads = [p.grad for p in params]
    if any(g is None for g in grads):
        raise RuntimeError("average_gradients: every parameter needs a .grad on every rank")
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group. Its backend (gloo's worker and I/O threads) is freed here only if
    nothing else still references the group; see the ``torch.distributed.nn`` import above."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Each value summed over ranks (float64, one collective); the values themselves when not distributed."""
    if not info.enabled:
        return list(values)
    backend_device = info.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
