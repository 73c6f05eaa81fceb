"""Map-style datasets as kdcache sees them: batches of (inputs, labels) fetched by index array."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from kdcache.storage.errors import UsageError

FINGERPRINT_SAMPLES = 64


def _split_item(item, spec: str):
    if isinstance(item, dict):
        if "input" not in item:
            raise UsageError(f"--data {spec!r}: dict items need an 'input' key, got {list(item)}")
        return item["input"], item.get("label")
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], item[1]
    return item, None


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _class_label(y) -> int:
    """An integer class id, or -1 for anything else (regression targets, vectors, None)."""
    a = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if a.ndim != 0 or a.dtype.kind not in "iuf" or not float(a).is_integer():
        return -1
    return int(a)


def get_batch(ds, ids: np.ndarray, spec: str = "data") -> tuple[torch.Tensor, np.ndarray]:
    """Inputs stacked into one tensor and int64 labels (-1 where an item has none).

    Only integer class ids count as labels; regression targets are not stored (a regression
    student distils from the teacher's stored outputs).

    Datasets with a vectorised `get_batch(ids) -> {"input", "label"}` skip the per-item loop.
    """
    if hasattr(ds, "get_batch"):
        batch = ds.get_batch(ids)
        labels = batch.get("label")
        labels = np.full(len(ids), -1, np.int64) if labels is None else np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            labels = np.array([_class_label(v) for v in labels], np.int64)
        return _as_tensor(batch["input"]), labels.astype(np.int64, copy=False)
    xs, ys = [], np.full(len(ids), -1, np.int64)
    for j, i in enumerate(ids):
        x, y = _split_item(ds[int(i)], spec)
        xs.append(_as_tensor(x))
        if y is not None:
            ys[j] = _class_label(y)
    return torch.stack(xs), ys


class BatchView(torch.utils.data.Dataset):
    """Index by an array of ids, so a DataLoader with a batch sampler fetches whole batches."""

    def __init__(self, ds, spec: str = "data"):
        self.ds = ds
        self.spec = spec

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, ids):
        x, y = get_batch(self.ds, np.asarray(ids, dtype=np.int64), self.spec)
        return torch.as_tensor(np.asarray(ids, dtype=np.int64)), x, torch.from_numpy(y)


def data_fingerprint(ds) -> str:
    """Content hash of the data set: its length and FINGERPRINT_SAMPLES evenly spaced items.

    Content, not spec, so that the same data reached through another wrapper still matches, and
    sampled so that a student can check it in well under a second on any size of data set.
    """
    n = len(ds)
    ids = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_SAMPLES)).astype(np.int64))
    x, y = get_batch(ds, ids)
    h = hashlib.sha256()
    h.update(f"{n}|{tuple(x.shape)}|{x.dtype}".encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.tobytes())
    return h.hexdigest()
