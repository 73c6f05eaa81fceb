"""The classification task: one class id per row, a student of cross-entropy on the labels, and
top-1 agreement with the cached teacher.

Hard loss ``-1/|M| * sum_{b in M} log softmax(z_s[b])[y_b]`` over the labeled rows ``M`` (a label
-1 is missing). Metrics are accuracy, mean cross-entropy and ECE on labeled data
(`kdcache.stages.tasks.scoring`), and agreement: the student's top-1 against the teacher's on the
first cached rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.stages import tasks
from kdcache.stages.common.data import get_batch
from kdcache.stages.common.device import to_device
from kdcache.stages.common.fmt import pct
from kdcache.stages.common.hooks import logits_of
from kdcache.stages.tasks import register, scoring
from kdcache.stages.tasks.base import Measure, Task
from kdcache.storage.codecs.losses import upcast
from kdcache.storage.errors import UsageError
from kdcache.storage.stream import span


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the labeled rows only (``label >= 0``; -1 marks a missing label).

    A batch with no labels returns 0, still attached to the graph so a combined loss can always
    call ``backward()``. Written without selecting the labeled rows (a data-dependent size) or
    asking whether there are any: neither waits on the device.
    """
    logits = upcast(student_logits)
    mask = labels >= 0
    per_row = F.cross_entropy(logits, labels.clamp_min(0).long(), reduction="none")
    return (per_row * mask).sum() / mask.sum().clamp_min(1)


def check_labels(labels: np.ndarray, ids: np.ndarray, num_classes: int) -> None:
    bad = (labels < -1) | (labels >= num_classes)
    if bad.any():
        j = int(np.argmax(bad))
        raise UsageError(
            f"label {int(labels[j])} of sample_id {int(ids[j])} is outside 0..{num_classes - 1} "
            f"for a teacher with {num_classes} outputs: fix the data set or the teacher's num_classes"
        )


def has_labels(ds, option: str = "--eval-data") -> None:
    _, y = get_batch(ds, np.arange(min(len(ds), 256)))
    if not (y >= 0).any():
        raise UsageError(f"{option} has no labels in its first {len(y)} rows: pass a labeled split")


class AgreementSet:
    """The first `rows` cached rows (first shards, for speed) and the teacher's top-1 on them:
    one per row, or one per stored token of a per-token task's row (its `length`, packed)."""

    def __init__(self, reader, data, rows: int, task: Task | None = None):
        ids, top, lengths = [], [], []
        self.task = task = task or tasks.get(reader.task)
        for i in range(len(reader.shards)):
            if sum(map(len, ids)) >= rows:
                break
            cols = reader.read_shard(i, features=False)
            ids.append(cols["sample_id"])
            top.append(reader.codec.teacher_top1(cols))
            lengths.append(cols["length"] if task.per_token else np.ones(len(ids[-1])))
        self.ids = np.concatenate(ids)[:rows]
        # Row i's teacher top-1 values are top1[offsets[i]:offsets[i + 1]].
        self.offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths)[:rows])]).astype(int)
        self.top1 = np.concatenate(top)[: self.offsets[-1]]
        self.data = data

    def batches(self, batch_size: int, rank: int = 0, world: int = 1):
        lo, hi = span(len(self.ids), rank, world)
        for a in range(lo, hi, batch_size):
            b = min(hi, a + batch_size)
            x = self.task.inputs(self.data, self.ids[a:b])
            yield x, self.task.top1_labels(x, self.top1[self.offsets[a] : self.offsets[b]])


@register
class Classification(Task):
    name = "classification"
    pseudo_labels = True
    best = ("eval_accuracy", 1)

    def inputs(self, ds, ids):
        return get_batch(ds, ids)[0]

    def logits(self, model, x):
        return logits_of(model(x))

    def width(self, z, what):
        if z.dim() == 1:
            z = z[:, None]
        if z.dim() > 2:
            raise UsageError(
                f"{what} outputs logits of shape {tuple(z.shape)}, not one row per sample: "
                "for a language model pass --task causal-lm"
            )
        return int(z.shape[1])

    def label_rows(self, data, every_row, chunk: int = 8192):
        labels = np.concatenate(
            [get_batch(data, np.arange(a, min(len(data), a + chunk)))[1]
             for a in range(0, len(data), chunk)]
        )  # fmt: skip
        return labels, np.flatnonzero(every_row | (labels >= 0)).astype(np.int64)

    def stored_labels(self, y, ids, width):
        check_labels(y, ids, width)
        return y, None

    def top1_labels(self, x, top1: np.ndarray) -> torch.Tensor:
        """The references of agreement: the teacher's top-1 per row."""
        return torch.from_numpy(top1)

    def hard_loss(self, z, batch, weight=None):
        return hard_loss(z, to_device(batch["label"], z.device))

    def check_eval_data(self, ds, width, option="--eval-data"):
        has_labels(ds, option)

    def eval_batches(self, ds, m: Measure, width, spec="--eval-data"):
        lo, hi = span(len(ds), m.rank, m.world)
        for a in range(lo, hi, m.batch_size):
            x, y = get_batch(ds, np.arange(a, min(hi, a + m.batch_size)))
            yield x, torch.from_numpy(y)

    def teacher_rows(self, reader, data, rows):
        return AgreementSet(reader, data, rows, self)

    def measure(self, model, batches, m: Measure, width):
        sums = scoring.eval_sums(model, batches, m.device, m.precision, self, m.logits_mb, m.head)
        return scoring.summarise(m.reduce(sums))

    def epoch_metrics(self, model, eval_data, rows, m: Measure, width):
        out = {"eval_loss": None, "eval_accuracy": None, "eval_ece": None, "agreement": None}
        if eval_data is not None:
            s = self.measure(model, self.eval_batches(eval_data, m, width), m, width)
            out.update(eval_loss=s["loss"], eval_accuracy=s["accuracy"], eval_ece=s["ece"])
        if rows is not None:
            batches = rows.batches(m.batch_size, m.rank, m.world)
            out["agreement"] = self.measure(model, batches, m, width)["accuracy"]
        return out

    def evaluate(self, model, ds, rows, m: Measure, width):
        self.check_eval_data(ds, width, "--data")
        result = self.measure(model, self.eval_batches(ds, m, width, "--data"), m, width)
        result["agreement"] = None
        if rows is not None:
            result["agreement"] = self.measure(model, rows.batches(m.batch_size), m, width)[
                "accuracy"
            ]
        return result

    def scores(self, row: dict) -> str:
        return f"eval_accuracy {pct(row['eval_accuracy'], 2)} agreement {pct(row['agreement'], 2)}"
