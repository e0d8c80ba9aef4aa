"""Several processes, GPUs or machines with PyTorch's own launcher (``torchrun``).

Launched by ``torchrun --nproc_per_node N ...`` (or ``--nnodes M --rdzv_backend c10d
--rdzv_endpoint HOST:PORT`` across machines), every process sees ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_from_env` then joins the process group (NCCL on CUDA, gloo on the
CPU) and picks the process's CUDA device (its local rank). Without torchrun it returns a
single-process context and nothing else changes.

How the work is split (docs/design.md section 14): the list of images still to predict is
computed by every process before anyone writes (a barrier), cut into interleaved shards
(``items[rank::world_size]``: deterministic and balanced), and each process writes its
predictions into the shared per-image cache; after a second barrier rank 0 alone reads the
cache and writes the tables, JSON files and visualisations. A restarted job recomputes only
what is missing from the cache, on every process. The processes must share the output folder
(a network file system across machines) and see the same dataset and checkpoint files.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)
T = TypeVar("T")

# predictions of one shard can take hours on a CPU: the barriers wait that long
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[T]) -> list[T]:
        """This process's share of ``items``: every ``world_size``-th item from ``rank``."""
        return list(items[self.rank::self.world_size]) if self.active else list(items)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (a list of one without torchrun)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def device(self, requested: str | None) -> str | None:
        """The device this process should use: ``cuda`` / auto becomes ``cuda:<local rank>``."""
        if not self.active or not torch.cuda.is_available():
            return requested
        if requested is None or requested == "auto" or requested == "cuda":
            return f"cuda:{self.local_rank}"
        return requested


def init_from_env(device: str | None = None) -> DistContext:
    """Join the torchrun process group when launched by torchrun; else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return DistContext()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda")
                                              or device == "auto")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
    logger.info("rank %d of %d (local %d), backend %s", rank, world, local, backend)
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend)


def shutdown(ctx: DistContext, *, clean: bool = True) -> None:
    """Leave the process group so that every process exits with nothing left running.

    On a clean exit all processes first meet at a barrier, so no process tears its connections
    down while a peer is still inside a collective or still writing (rank 0 writes the reports
    after the others are done); then the group is destroyed and its communication threads are
    joined before the interpreter shuts down (a group left to the interpreter's teardown can
    abort the process with ``terminate called without an active exception``). After an error
    (``clean=False``) the barrier is skipped: a peer may never reach it, and torchrun stops the
    others when one process fails.
    """
    if not ctx.active:
        return
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()  # drop the last references to the group's C++ objects now, not at exit
