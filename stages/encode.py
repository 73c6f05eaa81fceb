"""Turn one batch of teacher logits into stored columns plus the statistics the manifest keeps."""

from __future__ import annotations

import math

import numpy as np
import torch

from kdcache.storage.errors import UsageError


def check_logits(z: torch.Tensor, ids: np.ndarray, batch: int, task: str) -> torch.Tensor:
    if task == "regression" and z.dim() == 1:
        z = z[:, None]
    if z.dim() != 2 or z.shape[0] != batch:
        raise UsageError(
            f"the teacher returned shape {tuple(z.shape)} for a batch of {batch}; "
            "it must return logits of shape (batch, num_classes)"
        )
    bad = ~torch.isfinite(z).all(dim=1)
    if bad.any():
        where = ids[bad.cpu().numpy()][:5].tolist()
        raise UsageError(
            f"the teacher produced NaN/Inf outputs for sample_id {where}: check the checkpoint, "
            "the inputs, or use --precision fp32 (fp16 can overflow)"
        )
    return z


def check_labels(labels: np.ndarray, ids: np.ndarray, num_classes: int) -> None:
    bad = (labels < -1) | (labels >= num_classes)
    if bad.any():
        j = int(np.argmax(bad))
        raise UsageError(
            f"label {int(labels[j])} of sample_id {int(ids[j])} is outside 0..{num_classes - 1} "
            f"for a teacher with {num_classes} outputs: fix the data set or the teacher's num_classes"
        )


def topk_kl_cost(s: torch.Tensor, idx: torch.Tensor, lse: torch.Tensor) -> tuple:
    """Per-sample KL(teacher || top-k + residual bucket spread evenly) and residual mass.

    The reconstruction keeps the k exact probabilities and shares the residual mass r equally over
    the other C-k classes; the KL is what that loses: sum_rest p log p - r log(r / (C-k)).
    """
    c, k = s.shape[1], idx.shape[1]
    logp = s - lse[:, None]
    p = logp.exp()
    in_topk = torch.zeros_like(p, dtype=torch.bool).scatter_(1, idx, True)
    rest = torch.where(in_topk, torch.zeros_like(p), p)
    r = rest.sum(1)
    if k >= c:
        return torch.zeros_like(r), torch.zeros_like(r)
    ent = torch.where(in_topk, torch.zeros_like(p), p * logp).sum(1)
    safe = r.clamp_min(1e-30)
    kl = (ent - r * (safe.log() - math.log(c - k))).clamp_min(0)
    return kl, r


def encode_batch(z: torch.Tensor, labels: np.ndarray, ids: np.ndarray, settings: dict) -> tuple:
    """(columns for the shard, stats to add up) from raw teacher outputs z of shape (B, C)."""
    z = z.float()
    stats = {"rows": len(ids)}
    columns = {"sample_id": ids, "label": labels}
    if settings["task"] == "regression":
        columns["logits"] = z.cpu().numpy()
        return columns, stats
    s = z / settings["temperature"]
    labeled = labels >= 0
    if labeled.any():
        pred = z.argmax(1).cpu().numpy()
        stats["labeled"] = int(labeled.sum())
        stats["teacher_correct"] = int((pred[labeled] == labels[labeled]).sum())
    if settings["codec"] == "dense":
        columns["logits"] = s.cpu().numpy()
        return columns, stats
    k = settings["top_k"]
    vals, idx = torch.topk(s, k, dim=1)
    lse = torch.logsumexp(s, dim=1)
    kl, r = topk_kl_cost(s, idx, lse)
    stats["kl_sum"] = float(kl.double().sum())
    stats["residual_sum"] = float(r.double().sum())
    columns.update(
        topk_indices=idx.int().cpu().numpy(),
        topk_logits=vals.cpu().numpy(),
        logsumexp=lse.cpu().numpy(),
    )
    return columns, stats


def add_stats(total: dict, part: dict) -> dict:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value
    return total


def summarise(totals: dict) -> dict:
    """Means over the whole store from summed counters."""
    rows = totals.get("rows", 0)
    out = {"rows": rows}
    if totals.get("labeled"):
        out["teacher_accuracy"] = totals["teacher_correct"] / totals["labeled"]
        out["labeled_rows"] = totals["labeled"]
    if "kl_sum" in totals and rows:
        out["mean_topk_kl"] = totals["kl_sum"] / rows
        out["mean_residual_mass"] = totals["residual_sum"] / rows
    return out
