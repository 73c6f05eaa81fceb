"""Evaluating a student: accuracy, ECE and agreement with the teacher's top-1 on the cache.

The trainer calls `eval_sums` every epoch on each rank's share and all-reduces the sums;
`kdcache evaluate` (`run`) does the same for any finished training folder.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
import torch.distributed as dist

from kdcache.pipeline.data import get_batch, load_dataset
from kdcache.pipeline.models import load_model, logits_of
from kdcache.pipeline.runtime import autocast, resolve_device, sum_dtype, to_device
from kdcache.stages.config import EvaluateConfig
from kdcache.stages.metrics import batch_sums, summarise, sums_size, teacher_top1
from kdcache.storage.errors import UsageError
from kdcache.storage.fsio import open_location
from kdcache.storage.reader import CacheReader
from kdcache.storage.stream import check_data, span

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
            top.append(teacher_top1(cols))
        self.ids = np.concatenate(ids)[:rows]
        self.top1 = np.concatenate(top)[:rows]
        self.data = data

    def batches(self, batch_size: int, rank: int = 0, world: int = 1):
        lo, hi = span(len(self.ids), rank, world)
        for a in range(lo, hi, batch_size):
            b = min(hi, a + batch_size)
            x, _ = get_batch(self.data, self.ids[a:b])
            yield x, torch.from_numpy(self.top1[a:b])


def load_student(folder: str, storage_options: dict | None = None):
    """(student in eval mode, its summary.json) from a finished `kdcache train --out` folder."""
    loc = open_location(folder, storage_options)
    if not loc.exists("summary.json"):
        raise UsageError(
            f"--checkpoint {folder!r} has no summary.json: point it at a finished "
            "`kdcache train --out` folder (rerun that command to finish training)"
        )
    summary = json.loads(loc.read_bytes("summary.json"))
    url = folder.rstrip("/") + "/model.pt"
    model, _ = load_model(
        summary["student"], summary.get("student_args") or {}, url, storage_options, "--student"
    )
    return model, summary


def run(cfg: EvaluateConfig) -> dict:
    """Accuracy, ECE and loss on `cfg.data`; agreement with the cache's teacher when given."""
    cfg.validate()
    device = resolve_device(cfg.device)
    model, summary = load_student(cfg.checkpoint, cfg.storage_options)
    model = model.to(device)
    ds = load_dataset(cfg.data, cfg.data_args)
    has_labels(ds, "--data")
    result = summarise(eval_sums(model, dataset_batches(ds, cfg.batch_size), device, cfg.precision))
    result["agreement"] = None
    if cfg.cache:
        reader = CacheReader(cfg.cache, cfg.storage_options)
        # Agreement needs the inputs of the cached rows: the data set named in the manifest.
        source = reader.manifest["data"]
        cache_data = load_dataset(source["spec"], source.get("kwargs") or {})
        check_data(reader, cache_data, cfg.ignore_fingerprint)
        agree = AgreementSet(reader, cache_data, cfg.agree_rows)
        sums = eval_sums(model, agree.batches(cfg.batch_size), device, cfg.precision)
        result["agreement"] = summarise(sums)["accuracy"]
    result.update(name=summary.get("name"), student=summary["student"], data=cfg.data)
    return result
