"""A regression data set's true targets: a float scalar or a fixed-size vector per item, or none.

Items are read as `get_batch` reads them ((x, y), {"input", "label"} or a vectorised
`get_batch(ids)`), but `y` is kept as floats instead of a class id. A missing target is `None`
(or an item without one); inside kdcache it becomes a row of NaN, so every target that arrives
here must be finite: a NaN in the data would otherwise pass for "missing".
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.stages.common.data import _as_tensor, _split_item
from kdcache.storage.errors import UsageError


def _row(y, spec: str, sid: int) -> np.ndarray | None:
    if y is None:
        return None
    a = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if a.dtype == object or a.dtype.kind not in "biuf":
        raise UsageError(
            f"--data {spec!r} sample {sid}: target {y!r} is not a number or a vector of numbers; "
            "regression items are (x, float or float vector), or (x, None) for a missing target"
        )
    a = a.astype(np.float32).reshape(-1)
    if not np.isfinite(a).all():
        raise UsageError(
            f"--data {spec!r} sample {sid}: target {a.tolist()} is not finite; give finite "
            "targets, and None (not NaN) for a missing one"
        )
    return a


def _stack(rows: list, ids: np.ndarray, spec: str, width: int | None) -> np.ndarray:
    """(B, W) float32, NaN rows where the target is missing; every present row W wide."""
    want, first = width, None
    for sid, r in zip(ids, rows, strict=True):
        if r is None:
            continue
        if want is None:
            want, first = len(r), int(sid)
        if len(r) != want:
            other = (
                f"the model has {want} outputs" if first is None else f"sample {first} has {want}"
            )
            raise UsageError(
                f"--data {spec!r} sample {int(sid)}: target has {len(r)} values but {other}; "
                "every target must have the same width, the model's number of outputs"
            )
    out = np.full((len(rows), want or 1), np.nan, np.float32)
    for j, r in enumerate(rows):
        if r is not None:
            out[j] = r
    return out


def inputs_and_targets(ds, ids: np.ndarray, spec: str = "data", width: int | None = None):
    """(inputs stacked into one tensor, targets (B, W) float32 with NaN rows for missing ones),
    in one pass over the items. `width` (the teacher's or student's outputs) is the width every
    target must have; without it, the items must agree among themselves."""
    ids = np.asarray(ids, np.int64)
    if hasattr(ds, "get_batch"):
        batch = ds.get_batch(ids)
        y = batch.get("label")
        ys = [None] * len(ids) if y is None else list(y)
        x = _as_tensor(batch["input"])
    else:
        xs, ys = [], []
        for i in ids:
            xi, yi = _split_item(ds[int(i)], spec)
            xs.append(_as_tensor(xi))
            ys.append(yi)
        x = torch.stack(xs)
    rows = [_row(y, spec, int(i)) for y, i in zip(ys, ids, strict=True)]
    return x, _stack(rows, ids, spec, width)


class TargetView(torch.utils.data.Dataset):
    """`BatchView` for a regression teacher: batches of (ids, inputs, targets (B, W) float32)."""

    def __init__(self, ds, spec: str = "data", task: str = "regression"):
        self.ds, self.spec = ds, spec

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        x, t = inputs_and_targets(self.ds, ids, self.spec)
        return torch.as_tensor(ids), x, torch.from_numpy(t)


def check_targets(targets: np.ndarray, ids: np.ndarray, width: int) -> np.ndarray:
    """A batch's targets as (B, width): refuse present ones of another width than the teacher's."""
    present = ~np.isnan(targets).all(1)
    if not present.any():
        return np.full((len(ids), width), np.nan, np.float32)
    if targets.shape[1] != width:
        raise UsageError(
            f"target of sample_id {int(ids[np.argmax(present)])} has {targets.shape[1]} values but "
            f"the teacher outputs {width}: give targets of the teacher's width (or none)"
        )
    return targets


def target_stats(z: torch.Tensor, targets: np.ndarray) -> dict:
    """Additive per-shard sums over the rows with a target: their count, per-output sums and
    squared sums (mean and std), and the teacher's squared and absolute error against them."""
    keep = ~np.isnan(targets).all(1)
    t = targets[keep].astype(np.float64)
    err = z.detach().double().cpu().numpy()[keep] - t
    return {
        "target_rows": int(keep.sum()),
        "target_sum": t.sum(0).tolist(),
        "target_sqsum": (t**2).sum(0).tolist(),
        "teacher_sqerr": (err**2).sum(0).tolist(),
        "teacher_abserr": np.abs(err).sum(0).tolist(),
    }


def summarise_targets(totals: dict) -> dict:
    """The manifest's target statistics from the summed counters: `target_mean` and `target_std`
    per output (what `--normalize-targets` divides by), and the teacher's MSE, MAE and R² on the
    stored targets (the regression counterpart of `teacher_accuracy`)."""
    n = totals.get("target_rows", 0)
    if not n:
        return {"target_rows": 0}
    s, sq = np.asarray(totals["target_sum"]), np.asarray(totals["target_sqsum"])
    mean = s / n
    var = np.maximum(sq / n - mean**2, 0.0)
    sse = np.asarray(totals["teacher_sqerr"])
    r2 = [1 - e / (v * n) for e, v in zip(sse, var, strict=True) if v > 0]
    return {
        "target_rows": int(n),
        "target_mean": mean.tolist(),
        "target_std": np.sqrt(var).tolist(),
        "teacher_mse": float(sse.sum() / (n * len(s))),
        "teacher_mae": float(np.sum(totals["teacher_abserr"]) / (n * len(s))),
        "teacher_r2": float(np.mean(r2)) if r2 else None,
    }
