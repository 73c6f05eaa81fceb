"""Model identity without a checkpoint file (the store's own fingerprint is storage/manifest.py's)."""

from __future__ import annotations

import hashlib

import torch


def params_hash(model: torch.nn.Module) -> str:
    """Teacher identity when there is no checkpoint file: every parameter and buffer, in order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        # reshape(-1): a 0-d buffer (BatchNorm num_batches_tracked) cannot be viewed as bytes.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
