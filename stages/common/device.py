"""Tensors on a device: autocast precision, host-to-device copies and the dtype of metric sums.

The device itself is chosen by the pipeline (`kdcache.pipeline.runtime.resolve_device`); stages
receive a `torch.device`.
"""

from __future__ import annotations

import contextlib

import torch

from kdcache.storage.errors import UsageError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def placed_device(model) -> torch.device | None:
    """The input device of a teacher already spread over devices by its loader (Hugging Face
    `device_map=...` sets `hf_device_map`): such a model is used as placed, never moved, and its
    inputs go where its embedding is. None for an ordinary model."""
    if not getattr(model, "hf_device_map", None):
        return None
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    params = embed.parameters() if embed is not None else model.parameters()
    first = next(iter(params), None)
    return first.device if first is not None else None


def to_device(t, device: torch.device):
    """A tensor, or a dict of them (token inputs), on `device`."""
    if isinstance(t, dict):
        return {k: to_device(v, device) for k, v in t.items()}
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
