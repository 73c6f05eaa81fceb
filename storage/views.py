"""Views of augmented inputs: the per-row generator, the input hash and the per-epoch view choice.

A store made with `--views V --augment SPEC` holds V rows per sample, keyed (sample_id, view),
each the teacher's output on `augment(x, row_generator(seed, sample_id, view))`, with a 64-bit
hash of that input in the `input_hash` column. Stage two re-creates the same input from the same
generator and compares hashes, so a non-deterministic augmentation is caught, never trained on.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import torch

HASH_COLUMN = "input_hash"
HASH_FIELD = pa.field(HASH_COLUMN, pa.uint64(), nullable=False)
HASH_NAME = "blake2b-64"  # the manifest's views.hash: how input_hash is computed


def row_generator(seed: int, sample_id: int, view: int) -> torch.Generator:
    """A CPU generator seeded with the first 8 bytes (little-endian, >> 1) of
    sha256(f"{seed}|{sample_id}|{view}"): the same draws for the same row on any machine."""
    digest = hashlib.sha256(f"{seed}|{sample_id}|{view}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def input_hashes(x: torch.Tensor) -> np.ndarray:
    """uint64 per row of a batch: blake2b (8-byte digest) of the row's dtype, shape and bytes.

    dtype and shape are hashed too, so an augmentation that returns float64 or another size on
    replay is caught even when the bytes happened to agree."""
    a = x.detach().cpu().contiguous()
    head = f"{a.dtype}|{tuple(a.shape[1:])}|".encode()
    rows = a.numpy().reshape(len(a), -1) if a.dim() > 1 else a.numpy().reshape(len(a), 1)
    out = np.empty(len(a), np.uint64)
    for j, row in enumerate(rows):
        h = hashlib.blake2b(head, digest_size=8)
        h.update(row.tobytes())
        out[j] = int.from_bytes(h.digest(), "little")
    return out


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: a fast, well-spread 64-bit hash of a whole array at once.
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def chosen_views(seed: int, epoch: int, sample_ids: np.ndarray, views: int) -> np.ndarray:
    """The view each sample trains on in `epoch` (counted from 1, as the trainer does).

    Epochs 1..V, V+1..2V, ... are cycles; within a cycle sample i sees view
    `(offset(seed, cycle, i) + position) % V`, so every view is used exactly once per cycle of
    V epochs and the order differs between samples and between cycles."""
    k = int(epoch) - 1
    cycle, position = k // views, k % views
    ids = np.asarray(sample_ids, np.int64).astype(np.uint64)
    key = _mix(_mix(np.array([seed], np.int64).astype(np.uint64)) ^ np.uint64(cycle & (2**64 - 1)))
    offset = _mix(key ^ ids) % np.uint64(views)
    return ((offset + np.uint64(position)) % np.uint64(views)).astype(np.int32)
