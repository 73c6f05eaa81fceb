"""Turn one batch of teacher logits into stored columns plus the statistics the manifest keeps."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.stages.tasks.targets import summarise_targets, target_stats
from kdcache.storage.errors import UsageError


def check_token_logits(
    z: torch.Tensor, ids: np.ndarray, mask: torch.Tensor, finite: bool = True
) -> torch.Tensor:
    """A causal LM's logits (B, L, V) for inputs (B, L), finite at every real token (checked
    here, a full pass and a host sync, unless `finite` is False: the encoder checks then)."""
    if z.dim() != 3 or tuple(z.shape[:2]) != tuple(mask.shape):
        raise UsageError(
            f"the teacher returned shape {tuple(z.shape)} for input_ids of shape "
            f"{tuple(mask.shape)}; a causal LM must return logits of shape (batch, length, vocab)"
        )
    if finite:
        _refuse_non_finite(~(torch.isfinite(z).all(-1) | ~mask.to(z.device).bool()).all(-1), ids)
    return z


def _refuse_non_finite(bad: torch.Tensor, ids: np.ndarray) -> None:
    if bad.any():
        where = ids[bad.cpu().numpy()][:5].tolist()
        raise UsageError(
            f"the teacher produced NaN/Inf outputs for sample_id {where}: check the checkpoint, "
            "the inputs, or use --precision fp32 (fp16 can overflow)"
        )


def check_logits(z: torch.Tensor, ids: np.ndarray, batch: int) -> torch.Tensor:
    if z.dim() != 2 or z.shape[0] != batch:
        raise UsageError(
            f"the teacher returned shape {tuple(z.shape)} for a batch of {batch}; "
            "it must return logits of shape (batch, num_classes)"
        )
    _refuse_non_finite(~torch.isfinite(z).all(dim=1), ids)
    return z


def encode_batch(
    z: torch.Tensor,
    labels: np.ndarray,
    ids: np.ndarray,
    codec,
    temperature: float,
    views: np.ndarray | None = None,
    targets: np.ndarray | None = None,
) -> tuple:
    """(columns for the shard, stats to add up) from raw teacher outputs z of shape (B, C).

    The codec stores ``s = z / T`` its own way; the keys, the label and the teacher's accuracy on
    the labeled rows are the same for every codec. A regression teacher's batch also carries the
    true `targets` (B, C), NaN rows where missing (stages/tasks/targets.py).
    """
    z = z.float()
    stats = {"rows": len(ids)}
    labeled = labels >= 0
    if labeled.any():
        pred = z.argmax(1).cpu().numpy()
        stats["labeled"] = int(labeled.sum())
        stats["teacher_correct"] = int((pred[labeled] == labels[labeled]).sum())
    columns, codec_stats = codec.encode(z / temperature)
    columns.update(sample_id=ids, label=labels)
    if views is not None:
        columns["view"] = views
    if targets is not None:
        columns["target"] = targets
        stats |= target_stats(z, targets)
    return columns, stats | codec_stats


def add_stats(total: dict, part: dict) -> dict:
    for key, value in part.items():
        if isinstance(value, list):  # per-output sums (regression targets): add elementwise
            total[key] = (np.asarray(total.get(key, 0.0)) + np.asarray(value)).tolist()
        else:
            total[key] = total.get(key, 0) + value
    return total


def summarise(totals: dict, codec) -> dict:
    """Means over the whole store from summed counters."""
    rows = totals.get("rows", 0)
    out = {"rows": rows}
    if totals.get("labeled"):
        out["teacher_accuracy"] = totals["teacher_correct"] / totals["labeled"]
        out["labeled_rows"] = totals["labeled"]
    if "target_rows" in totals:
        out |= summarise_targets(totals)
    return out | codec.summarise(totals)
