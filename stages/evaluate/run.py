"""`kdcache evaluate`: a finished student measured on labeled data and against its cache's
teacher, by its task (`Task.evaluate`: accuracy, ECE and loss, per token with perplexity for
causal-lm; MSE, MAE and R² for regression).

The trainer measures every epoch the same way (`Task.epoch_metrics`), on each rank's share with
the sums all-reduced; here one process measures everything.
"""

from __future__ import annotations

import logging

import torch

from kdcache.stages import tasks
from kdcache.stages.evaluate.config import EvaluateConfig
from kdcache.stages.tasks.base import Measure
from kdcache.stages.tasks.classification import AgreementSet
from kdcache.stages.tasks.scoring import eval_sums, reduce_sums
from kdcache.stages.train.streams import check_data
from kdcache.storage.errors import UsageError

log = logging.getLogger("kdcache.evaluate")

# Callers measuring by hand (tests, reports, deploy) find the pieces here too.
__all__ = ["AgreementSet", "dataset_batches", "eval_sums", "reduce_sums", "run", "width_of"]


def dataset_batches(ds, batch_size: int, rank: int = 0, world: int = 1, task=None):
    """(inputs, references) over a rank's contiguous share of a data set, by its task."""
    t = tasks.get(task) if task is None or isinstance(task, str) else task
    return t.eval_batches(ds, Measure(batch_size=batch_size, rank=rank, world=world), None)


def width_of(model, ds, task, device) -> int:
    """The output width of `model` from a two-row forward (eval mode)."""
    x = task.inputs(ds, torch.arange(min(2, len(ds))).numpy())
    model.eval()
    with torch.no_grad():
        z = task.logits(model, {k: v.to(device) for k, v in x.items()} if isinstance(x, dict)
                        else x.to(device))  # fmt: skip
    return task.width(z, "--student")


def run(cfg: EvaluateConfig, model, summary: dict, ds, device, reader=None, cache_data=None):
    """The task's figures of `model` (on `device`) on `ds`, and against the teacher of the cache
    `reader` when given, on `cache_data` (the data set its manifest names)."""
    name = summary.get("settings", {}).get("task")
    task = tasks.get(name)
    if reader is not None and tasks.get(reader.task) is not task:
        raise UsageError(
            f"--cache {reader.url} holds a {reader.task} teacher but the student is "
            f"{task.name}: pass the student's store"
        )
    m = Measure(device, cfg.precision, cfg.batch_size or task.eval_rows, cfg.eval_logits_mb)
    width = width_of(model, ds, task, device)
    rows = None
    if reader is not None:
        check_data(reader, cache_data, cfg.ignore_fingerprint)
        rows = task.teacher_rows(reader, cache_data, cfg.agree_rows or task.agree_rows)
    result = {"name": summary.get("name"), "student": summary["student"], "data": cfg.data}
    return task.evaluate(model, ds, rows, m, width) | result
