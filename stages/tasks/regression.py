"""Regression distillation: the student's loss against the teacher and the true targets, and its
metrics on `--eval-data` and against the teacher.

Loss per batch, over the outputs d = 1..W:

    alpha * MSE(z_s, z_t) + (1 - alpha) * MSE(z_s, y) + beta * feature

with ``z_t`` the teacher's stored outputs (every row) and ``y`` the store's true targets; the
target term averages over the rows of the batch that have one (like a missing class label, a
missing target leaves its row out of that term; a batch without any contributes 0). With
`--normalize-targets` every squared error of output d is divided by ``std_d^2``, the variance of
the stored targets (manifest ``stats.target_std``): the same as comparing standardised values
``(v - mean_d) / std_d``, so the loss is unit-free and each output counts the same whatever its
scale. (The ratio of the two MSE terms, which alpha sets, is scale-free either way: both are in
the targets' units squared.)

alpha: the `--alpha` default (None) becomes 0.9, as for classifiers, on a store that holds
targets, and 1 (teacher only, the loss regression students had before targets were stored) on one
that holds none; an explicit alpha < 1 on such a store is refused.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.stages.common.device import autocast, sum_dtype, to_device
from kdcache.stages.tasks import causal_lm as lm
from kdcache.stages.tasks import regression_metrics
from kdcache.stages.tasks.targets import inputs_and_targets
from kdcache.stages.train import loss as losses
from kdcache.stages.train.streams import check_data
from kdcache.storage.errors import UsageError
from kdcache.storage.stream import span

TASK = "regression"
DEFAULT_ALPHA = 0.9


def resolve_alpha(cfg, reader) -> None:
    """Fill `cfg.alpha` when it was not given, and refuse what a regression store cannot give."""
    regression = reader is not None and reader.task == TASK
    if cfg.normalize_targets and not (regression and reader.target_rows):
        what = f"the cache {reader.url} holds no targets" if reader else "there is no --cache"
        raise UsageError(
            f"--normalize-targets divides by the stored targets' std, but {what}: drop it, or "
            "precompute a regression store from data with targets"
        )
    if not regression or reader.target_rows:
        cfg.alpha = DEFAULT_ALPHA if cfg.alpha is None else cfg.alpha
    elif cfg.alpha is None:
        cfg.alpha = 1.0
    elif cfg.alpha < 1:
        raise UsageError(
            f"--alpha {cfg.alpha} weighs true targets by 1 - alpha, but the regression cache "
            f"{reader.url} stores none (made before targets were kept, or from data without "
            "them): use --alpha 1, or precompute it again (--force) from data with targets"
        )


def mse(pred: torch.Tensor, ref: torch.Tensor, weight=None, mask=None) -> torch.Tensor:
    """``mean_{b in mask, d} weight_d * (pred - ref)^2``; 0 (still in the graph) for no rows."""
    if mask is not None:
        if not bool(mask.any()):
            return pred.sum() * 0.0
        pred, ref = pred[mask], ref[mask]
    err = (pred - ref.to(pred.dtype)) ** 2
    return (err if weight is None else err * weight).mean()


class RegressionTerms:
    """The loss terms of a regression student, from the store's teacher outputs and targets."""

    def __init__(self, reader, cfg):
        self.codec, self.alpha, self.beta = reader.codec, cfg.alpha, cfg.beta
        self.weight = None
        if cfg.normalize_targets:
            std = np.asarray(reader.manifest["stats"]["target_std"], np.float64)
            std = np.where(std > 0, std, 1.0)  # a constant output keeps its raw scale
            self.weight = torch.as_tensor(1.0 / std**2, dtype=torch.float32)

    def __call__(self, z, proj, batch, device) -> dict[str, torch.Tensor]:
        z = z.reshape(len(z), -1)
        w = self.weight
        if w is not None and w.device != z.device:
            self.weight = w = w.to(z.device)  # once: it is the same every batch
        teacher = to_device(self.codec.teacher_values(batch), device)
        soft = mse(z, teacher, w)
        hard = feat = z.new_zeros(())
        if "target" in batch:
            y = to_device(batch["target"], device)
            hard = mse(z, y, w, ~torch.isnan(y).any(1))
        if proj is not None:
            feat = losses.feature_loss(proj, to_device(batch["features"], device))
        total = self.alpha * soft + (1 - self.alpha) * hard + self.beta * feat
        return {"loss": total, "hard_loss": hard, "soft_loss": soft, "feature_loss": feat}


class TeacherRows:
    """The first `rows` cached rows (first shards, for speed) and the teacher's outputs on them."""

    def __init__(self, reader, data, rows: int):
        ids, values = [], []
        for i in range(len(reader.shards)):
            if sum(map(len, ids)) >= rows:
                break
            cols = reader.read_shard(i, features=False)
            ids.append(cols["sample_id"])
            values.append(np.asarray(reader.codec.teacher_values(cols), np.float32))
        self.ids, self.values = np.concatenate(ids)[:rows], np.concatenate(values)[:rows]
        self.data = data

    def batches(self, batch_size: int, rank: int = 0, world: int = 1):
        lo, hi = span(len(self.ids), rank, world)
        for a in range(lo, hi, batch_size):
            x = lm.inputs(self.data, self.ids[a : min(hi, a + batch_size)], TASK)
            yield x, torch.from_numpy(self.values[a : min(hi, a + batch_size)])


def target_batches(
    ds, batch_size: int, width: int, rank: int = 0, world: int = 1, spec="--eval-data"
):
    """(x, targets) over this rank's contiguous share of a regression data set."""
    lo, hi = span(len(ds), rank, world)
    for a in range(lo, hi, batch_size):
        yield inputs_and_targets(ds, np.arange(a, min(hi, a + batch_size)), spec, width)


@torch.no_grad()
def eval_sums(model, batches, device, width: int, precision: str = "fp32") -> torch.Tensor:
    """Summed regression metric vector of `model` over (x, reference) batches (eval mode)."""
    model.eval()
    total = torch.zeros(regression_metrics.sums_size(width), dtype=sum_dtype(device), device=device)
    for x, y in batches:
        with autocast(device, precision):
            z = lm.logits(model, to_device(x, device), TASK)
        total += regression_metrics.batch_sums(z.float(), torch.as_tensor(y), total.dtype)
    return total


def measure(model, batches, device, width: int, precision: str, reduce=lambda s: s) -> dict:
    """n, mse, mae and r2 of `model` over (x, reference) batches, summed over ranks by `reduce`."""
    return regression_metrics.summarise(reduce(eval_sums(model, batches, device, width, precision)))


def metrics(model, device, width, precision, batch_size, eval_data=None, teacher_rows=None,
            rank=0, world=1, reduce=lambda s: s) -> dict:  # fmt: skip
    """eval_mse/mae/r2 on `eval_data`'s targets and teacher_mse/r2 on `teacher_rows` (each None
    without them); `reduce` sums a vector over the ranks."""
    out = dict.fromkeys(regression_metrics.FIELDS)
    if eval_data is not None:
        batches = target_batches(eval_data, batch_size, width, rank, world)
        m = measure(model, batches, device, width, precision, reduce)
        out.update(eval_mse=m["mse"], eval_mae=m["mae"], eval_r2=m["r2"])
    if teacher_rows is not None:
        batches = teacher_rows.batches(batch_size, rank, world)
        m = measure(model, batches, device, width, precision, reduce)
        out.update(teacher_mse=m["mse"], teacher_r2=m["r2"])
    return out


def evaluate_run(cfg, model, summary, ds, device, reader=None, cache_data=None) -> dict:
    """`kdcache evaluate` of a regression student: n (rows with a target), mse, mae and r2 on
    `ds`, and teacher_mse / teacher_r2 on the first cached rows of `reader` when given."""
    x = lm.inputs(ds, np.arange(min(2, len(ds))), TASK)
    model.eval()
    with torch.no_grad():
        z = lm.logits(model, to_device(x, device), TASK)
    width = int(z.reshape(len(z), -1).shape[1])
    has_targets(ds, width, "--data")
    m = measure(model, target_batches(ds, cfg.batch_size, width, spec="--data"), device, width,
                cfg.precision)  # fmt: skip
    out = {"name": summary.get("name"), "student": summary["student"], "data": cfg.data}
    out |= {k: m[k] for k in ("n", "mse", "mae", "r2")} | {"teacher_mse": None, "teacher_r2": None}
    if reader is not None:
        check_data(reader, cache_data, cfg.ignore_fingerprint)
        rows = TeacherRows(reader, cache_data, cfg.agree_rows)
        t = measure(model, rows.batches(cfg.batch_size), device, width, cfg.precision)
        out.update(teacher_mse=t["mse"], teacher_r2=t["r2"])
    return out


def has_targets(ds, width: int, option: str = "--eval-data") -> None:
    """Refuse a regression eval set whose first rows hold no target (or bad ones: width, NaN)."""
    _, y = inputs_and_targets(ds, np.arange(min(len(ds), 256)), option, width)
    if np.isnan(y).all():
        raise UsageError(
            f"{option} has no targets in its first {len(y)} rows: pass a split with targets"
        )
