"""The execution environment of one process: its device and its place in torch.distributed.

Stages receive a `Dist` and a `torch.device`; only the pipeline makes or ends a process group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdcache.storage.errors import KdcacheError, UsageError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's Python object on every rank (how one rank's decision reaches the others)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def decide(self, fn):
        """`fn()` on rank 0 and its result on every rank; when it fails, every rank fails.

        The other ranks wait on the broadcast whatever went wrong, so rank 0 always sends: its
        result, or its error (a KdcacheError as is, anything else wrapped) which they raise.
        """
        result: tuple = ("ok", None)
        if self.is_main:
            try:
                result = ("ok", fn())
            except Exception as exc:
                shared = exc if isinstance(exc, KdcacheError) else KdcacheError(f"rank 0: {exc}")
                self.broadcast(("error", shared))
                raise
        kind, value = self.broadcast(result)
        if kind == "error":
            raise value
        return value


def init_distributed(device_type: str = "cpu") -> Dist:
    """Join the process group torchrun describes in the environment; a no-op when run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            # Collectives on objects use the current device: without this every rank is cuda:0.
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        # A resumed run can leave one rank with most of the missing shards while the others
        # wait at the barrier: the default 10-30 min timeout would fail such a rerun every time.
        timeout = float(os.environ.get("KDCACHE_DIST_TIMEOUT", 6 * 3600))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


@contextlib.contextmanager
def process_group(device: str):
    """The Dist of this process for a job on `device`; a group made here is destroyed here
    (gloo aborts the process at exit otherwise), one made by a caller is left to it."""
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    owns = not (dist.is_available() and dist.is_initialized())
    d = init_distributed("cuda" if wants_cuda else "cpu")
    try:
        yield d
    finally:
        if owns and d.enabled:
            shutdown_distributed()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(
            f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available here; use --device cpu")
    return device
