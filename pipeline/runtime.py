"""Devices, precision and torch.distributed: the execution environment of one process."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdcache.storage.errors import UsageError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast where the device supports it; fp32 runs as is."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype is torch.float16:
        raise UsageError("--precision fp16 needs a GPU; on CPU use --precision bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned memory and non-blocking copies only pay off (and only are safe) on CUDA; a batch the
    # DataLoader already pinned, or a tensor already on the GPU, is not pinned again.
    if device.type == "cuda":
        if t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def sum_dtype(device: torch.device) -> torch.dtype:
    """Dtype for metric sums: float64 for exact counts, float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64
