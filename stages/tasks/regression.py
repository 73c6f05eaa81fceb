"""The regression task: W float outputs per row, a student of MSE to the teacher's stored outputs
and to the store's true targets, measured by MSE, MAE and R².

Loss per batch, over the outputs d = 1..W:

    alpha * MSE(z_s, z_t) + (1 - alpha) * MSE(z_s, y) + beta * feature

with ``z_t`` the teacher's stored outputs (every row) and ``y`` the store's true targets; the
target term averages over the rows of the batch that have one (like a missing class label, a
missing target leaves its row out of that term; a batch without any contributes 0). With
`--normalize-targets` every squared error of output d is divided by ``std_d^2``, the variance of
the stored targets (manifest ``stats.target_std``): the same as comparing standardised values
``(v - mean_d) / std_d``, so the loss is unit-free and each output counts the same whatever its
scale. `mse` is the one MSE of both terms.

alpha: the `--alpha` default (None) becomes 0.9, as for classifiers, on a store that holds
targets, and 1 (teacher only, the loss regression students had before targets were stored) on one
that holds none; an explicit alpha < 1 on such a store is refused.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.stages.common.data import get_batch
from kdcache.stages.common.device import autocast, sum_dtype, to_device
from kdcache.stages.common.hooks import logits_of
from kdcache.stages.tasks import register, regression_metrics
from kdcache.stages.tasks.base import DEFAULT_ALPHA, Measure
from kdcache.stages.tasks.classification import Classification
from kdcache.stages.tasks.targets import TargetView, check_targets, inputs_and_targets
from kdcache.storage.codecs.losses import check_same_shape
from kdcache.storage.errors import UsageError
from kdcache.storage.stream import span


def mse(pred: torch.Tensor, ref: torch.Tensor, weight=None, mask=None) -> torch.Tensor:
    """``mean_{b in mask, d} weight_d * (pred - ref)^2`` of rows (B, W) (a (B,) output is one
    column); 0 (still in the graph) for no rows. Shapes must match: no broadcasting."""
    pred, ref = pred.reshape(len(pred), -1), ref.reshape(len(ref), -1)
    check_same_shape(pred, ref, "mse")
    if mask is not None:
        if not bool(mask.any()):
            return pred.sum() * 0.0
        pred, ref = pred[mask], ref[mask]
    err = (pred - ref.to(pred.dtype)) ** 2
    return (err if weight is None else err * weight).mean()


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
            x = get_batch(self.data, self.ids[a : min(hi, a + batch_size)])[0]
            yield x, torch.from_numpy(self.values[a : min(hi, a + batch_size)])


def has_targets(ds, width: int, option: str = "--eval-data") -> None:
    """Refuse a regression eval set whose first rows hold no target (or bad ones: width, NaN)."""
    _, y = inputs_and_targets(ds, np.arange(min(len(ds), 256)), option, width)
    if np.isnan(y).all():
        raise UsageError(
            f"{option} has no targets in its first {len(y)} rows: pass a split with targets"
        )


@torch.no_grad()
def eval_sums(model, batches, device, width: int, precision: str = "fp32") -> torch.Tensor:
    """Summed regression metric vector of `model` over (x, reference) batches (eval mode)."""
    model.eval()
    total = torch.zeros(regression_metrics.sums_size(width), dtype=sum_dtype(device), device=device)
    for x, y in batches:
        with autocast(device, precision):
            z = logits_of(model(to_device(x, device)))
        total += regression_metrics.batch_sums(z.float(), torch.as_tensor(y), total.dtype)
    return total


@register
class Regression(Classification):
    """Rows and outputs as a classifier's (one output row per input row); its own loss and
    metrics."""

    name = "regression"
    codec = "dense"
    temperature = 1.0
    tempered = False  # raw outputs are stored: there is nothing to temper
    needs_cache = True
    pseudo_labels = False
    soft_on_values = True
    stores_targets = True
    row_fields = regression_metrics.FIELDS
    best = ("eval_mse", -1)
    report_table = "regression"

    def batch_view(self, ds, spec):
        return TargetView(ds, spec)

    def stored_labels(self, y, ids, width):
        # Float targets, kept in their own column; no class labels.
        return np.full(len(ids), -1, np.int64), check_targets(y, ids, width)

    def teacher_outputs(self, z):
        return z[:, None] if z.dim() == 1 else z

    def width(self, z, what):
        return super().width(z.reshape(len(z), -1), what)

    def label_rows(self, data, every_row):
        raise UsageError("--task regression needs --cache (a regression teacher's store)")

    def resolve(self, cfg, reader) -> dict:
        """alpha's default, and what a regression store cannot give."""
        targets = bool(reader.target_rows)
        if cfg.normalize_targets and not targets:
            raise UsageError(
                f"--normalize-targets divides by the stored targets' std, but the cache "
                f"{reader.url} holds no targets: drop it, or precompute a regression store from "
                "data with targets"
            )
        if targets:
            return {"alpha": DEFAULT_ALPHA if cfg.alpha is None else cfg.alpha}
        if cfg.alpha is not None and cfg.alpha < 1:
            raise UsageError(
                f"--alpha {cfg.alpha} weighs true targets by 1 - alpha, but the regression cache "
                f"{reader.url} stores none (made before targets were kept, or from data without "
                "them): use --alpha 1, or precompute it again (--force) from data with targets"
            )
        return {"alpha": 1.0}

    def loss_weight(self, reader, cfg):
        if not cfg.normalize_targets:
            return None
        std = np.asarray(reader.manifest["stats"]["target_std"], np.float64)
        std = np.where(std > 0, std, 1.0)  # a constant output keeps its raw scale
        return torch.as_tensor(1.0 / std**2, dtype=torch.float32)

    def hard_loss(self, z, batch, weight=None):
        if "target" not in batch:
            return z.new_zeros(())
        y = to_device(batch["target"], z.device)
        return mse(z, y, weight, ~torch.isnan(y).any(1))

    def value_loss(self, z, values, weight=None):
        """The soft term: MSE to the teacher's stored outputs."""
        return mse(z, values, weight)

    def check_eval_data(self, ds, width, option="--eval-data"):
        has_targets(ds, width, option)

    def eval_batches(self, ds, m: Measure, width, spec="--eval-data"):
        lo, hi = span(len(ds), m.rank, m.world)
        for a in range(lo, hi, m.batch_size):
            yield inputs_and_targets(ds, np.arange(a, min(hi, a + m.batch_size)), spec, width)

    def teacher_rows(self, reader, data, rows):
        return TeacherRows(reader, data, rows)

    def measure(self, model, batches, m: Measure, width):
        sums = eval_sums(model, batches, m.device, width, m.precision)
        return regression_metrics.summarise(m.reduce(sums))

    def epoch_metrics(self, model, eval_data, rows, m: Measure, width):
        out = {"eval_loss": None, "eval_accuracy": None, "eval_ece": None, "agreement": None}
        out |= dict.fromkeys(regression_metrics.FIELDS)
        if eval_data is not None:
            s = self.measure(model, self.eval_batches(eval_data, m, width), m, width)
            out.update(eval_mse=s["mse"], eval_mae=s["mae"], eval_r2=s["r2"])
        if rows is not None:
            s = self.measure(model, rows.batches(m.batch_size, m.rank, m.world), m, width)
            out.update(teacher_mse=s["mse"], teacher_r2=s["r2"])
        return out

    def evaluate(self, model, ds, rows, m: Measure, width):
        """n (rows with a target), mse, mae and r2 on `ds`, and teacher_mse / teacher_r2 on the
        first cached rows when given."""
        self.check_eval_data(ds, width, "--data")
        s = self.measure(model, self.eval_batches(ds, m, width, "--data"), m, width)
        out = {k: s[k] for k in ("n", "mse", "mae", "r2")}
        out |= {"teacher_mse": None, "teacher_r2": None}
        if rows is not None:
            t = self.measure(model, rows.batches(m.batch_size), m, width)
            out.update(teacher_mse=t["mse"], teacher_r2=t["r2"])
        return out

    def scores(self, row: dict) -> str:
        return regression_metrics.scores(row)
