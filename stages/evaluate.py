"""Evaluating a student: accuracy, ECE and agreement with the teacher's top-1 on the cache.

The trainer calls `eval_sums` every epoch on each rank's share and all-reduces the sums;
`kdcache evaluate` (`run`, given the built student and data sets) does the same for any finished
training folder.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist

from kdcache.stages.config import EvaluateConfig
from kdcache.stages.data import get_batch
from kdcache.stages.device import autocast, sum_dtype, to_device
from kdcache.stages.hooks import logits_of
from kdcache.stages.loader import check_data
from kdcache.stages.metrics import batch_sums, summarise, sums_size
from kdcache.storage.errors import UsageError
from kdcache.storage.reader import CacheReader
from kdcache.storage.stream import span

log = logging.getLogger("kdcache.evaluate")


def reduce_sums(sums: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Sum a metric vector over ranks (gloo and nccl both take float64; MPS sums are float32)."""
    if enabled:
        dist.all_reduce(sums)
    return sums


@torch.no_grad()
def eval_sums(model, batches, device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """Summed metric vector of `model` over (inputs, labels) batches; leaves the model in eval."""
    model.eval()
    total = torch.zeros(sums_size(), dtype=sum_dtype(device), device=device)
    for x, y in batches:
        with autocast(device, precision):
            z = logits_of(model(to_device(x, device)))
        total += batch_sums(z.float(), to_device(y, device))
    return total


def dataset_batches(ds, batch_size: int, rank: int = 0, world: int = 1):
    """(x, labels) over this rank's contiguous share of a map-style data set."""
    lo, hi = span(len(ds), rank, world)
    for a in range(lo, hi, batch_size):
        x, y = get_batch(ds, np.arange(a, min(hi, a + batch_size)))
        yield x, torch.from_numpy(y)


def has_labels(ds, option: str = "--eval-data") -> None:
    _, y = get_batch(ds, np.arange(min(len(ds), 256)))
    if not (y >= 0).any():
        raise UsageError(f"{option} has no labels in its first {len(y)} rows: pass a labeled split")


class AgreementSet:
    """The first `rows` cached rows (first shards, for speed) and the teacher's top-1 on them."""

    def __init__(self, reader: CacheReader, data, rows: int):
        ids, top = [], []
        for i in range(len(reader.shards)):
            if sum(map(len, ids)) >= rows:
                break
            cols = reader.read_shard(i, features=False)
            ids.append(cols["sample_id"])
            top.append(reader.codec.teacher_top1(cols))
        self.ids = np.concatenate(ids)[:rows]
        self.top1 = np.concatenate(top)[:rows]
        self.data = data

    def batches(self, batch_size: int, rank: int = 0, world: int = 1):
        lo, hi = span(len(self.ids), rank, world)
        for a in range(lo, hi, batch_size):
            b = min(hi, a + batch_size)
            x, _ = get_batch(self.data, self.ids[a:b])
            yield x, torch.from_numpy(self.top1[a:b])


def run(cfg: EvaluateConfig, model, summary: dict, ds, device, reader=None, cache_data=None):
    """Accuracy, ECE and loss of `model` (on `device`) on `ds`; agreement with the teacher of
    the cache `reader` when given, on `cache_data` (the data set its manifest names)."""
    has_labels(ds, "--data")
    result = summarise(eval_sums(model, dataset_batches(ds, cfg.batch_size), device, cfg.precision))
    result["agreement"] = None
    if reader is not None:
        check_data(reader, cache_data, cfg.ignore_fingerprint)
        agree = AgreementSet(reader, cache_data, cfg.agree_rows)
        sums = eval_sums(model, agree.batches(cfg.batch_size), device, cfg.precision)
        result["agreement"] = summarise(sums)["accuracy"]
    result.update(name=summary.get("name"), student=summary["student"], data=cfg.data)
    return result
