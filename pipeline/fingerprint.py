"""Fingerprints: what makes two caches the same cache."""

from __future__ import annotations

import hashlib
import json

import torch


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def params_hash(model: torch.nn.Module) -> str:
    """Teacher identity when there is no checkpoint file: every parameter and buffer, in order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        # reshape(-1): a 0-d buffer (BatchNorm num_batches_tracked) cannot be viewed as bytes.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# The header fields that decide the bytes of a store. Execution settings (device, batch size,
# workers) are left out on purpose: they change speed, not what is computed, so a cache made on a
# GPU serves a CPU rerun. Precision stays in: bf16 logits are different numbers.
FINGERPRINT_FIELDS = (
    "teacher",
    "data",
    "temperature",
    "soft_labels",
    "features",
    "shard_rows",
    "task",
    "precision",
)


def store_fingerprint(header: dict) -> str:
    teacher = {k: v for k, v in header["teacher"].items() if k != "checkpoint"}
    doc = {k: header.get(k) for k in FINGERPRINT_FIELDS}
    doc["teacher"] = teacher
    doc["data"] = {k: v for k, v in header["data"].items()}
    return hash_json(doc)
