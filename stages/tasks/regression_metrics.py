"""Regression metrics as additive sums (so ranks can all_reduce them), and their log and totals.

A batch of predictions `p` (B, W) against references `y` (B, W), rows whose reference is missing
(NaN) left out, contributes the float64 vector ``[n, sse_1..W, sae_1..W, sy_1..W, syy_1..W]``;
`summarise` turns any sum of such vectors into

- ``mse = sum_d sse_d / (n W)`` and ``mae = sum_d sae_d / (n W)``,
- ``r2 = mean_d (1 - sse_d / (syy_d - sy_d^2 / n))``: R² per output, averaged uniformly over the
  outputs as scikit-learn's `r2_score` does by default (None when an output has no variance).

The references are the true targets of `--eval-data` (`eval_mse`, `eval_mae`, `eval_r2`) or the
teacher's stored outputs on the first cached rows (`teacher_mse`, `teacher_r2`: how closely the
student imitates its teacher, the regression counterpart of top-1 agreement).
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.stages.common.fmt import num

#: The per-epoch columns a regression run adds to metrics.csv and summary.json.
FIELDS = ("eval_mse", "eval_mae", "eval_r2", "teacher_mse", "teacher_r2")


def sums_size(width: int) -> int:
    return 1 + 4 * width


def batch_sums(pred: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive metric vector of one batch; rows of `ref` holding NaN are skipped."""
    pred = pred.reshape(len(pred), -1).to(dtype)
    ref = ref.reshape(len(ref), -1).to(device=pred.device, dtype=dtype)
    keep = ~torch.isnan(ref).any(1)
    pred, ref = pred[keep], ref[keep]
    err = pred - ref
    parts = [err.pow(2).sum(0), err.abs().sum(0), ref.sum(0), ref.pow(2).sum(0)]
    return torch.cat([pred.new_tensor([float(len(ref))]), *parts])


def summarise(sums: torch.Tensor | np.ndarray | None) -> dict:
    """mse, mae and r2 (see the module doc) of summed vectors; all None when no row counted."""
    if sums is None:
        return {"n": 0, "mse": None, "mae": None, "r2": None}
    s = np.asarray(sums.cpu() if isinstance(sums, torch.Tensor) else sums, dtype=np.float64)
    n, w = s[0], (len(s) - 1) // 4
    if n == 0:
        return {"n": 0, "mse": None, "mae": None, "r2": None}
    sse, sae, sy, syy = s[1 : 1 + w], s[1 + w : 1 + 2 * w], s[1 + 2 * w : 1 + 3 * w], s[1 + 3 * w :]
    var = syy - sy**2 / n
    r2 = None if (var <= 1e-12 * np.maximum(syy, 1)).any() else float(np.mean(1 - sse / var))
    return {
        "n": int(n),
        "mse": float(sse.sum() / (n * w)),
        "mae": float(sae.sum() / (n * w)),
        "r2": r2,
    }


def scores(row: dict) -> str:
    """`eval_mse 0.0123 eval_mae ... vs_teacher mse ... r2 ...` of one epoch (or summary) row."""
    return (
        f"eval_mse {num(row.get('eval_mse'), '.4g')} eval_mae {num(row.get('eval_mae'), '.4g')}"
        f" eval_r2 {num(row.get('eval_r2'), '.4f')} teacher_mse "
        f"{num(row.get('teacher_mse'), '.4g')} teacher_r2 {num(row.get('teacher_r2'), '.4f')}"
    )
