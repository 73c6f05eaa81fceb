"""Evaluating a student: accuracy, ECE and agreement with the teacher's top-1 on the cache.

The trainer calls `eval_sums` every epoch on each rank's share and all-reduces the sums;
`kdcache evaluate` (`run`, given the built student and data sets) does the same for any finished
training folder. A causal-lm student is measured per token: each position with a next token is a
row labeled with that token (so `loss` is nats/token, plus `perplexity`), and agreement compares
every stored token's teacher top-1 (stages/tasks/causal_lm.py).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist

from kdcache.stages.common.config import EVAL_LOGITS_MB, EvaluateConfig, eval_rows
from kdcache.stages.common.data import get_batch
from kdcache.stages.common.device import autocast, sum_dtype, to_device
from kdcache.stages.evaluate.metrics import batch_sums, summarise, sums_size
from kdcache.stages.tasks import causal_lm as lm
from kdcache.stages.tasks import regression
from kdcache.stages.train import lm_loss
from kdcache.stages.train.streams import check_data
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
def eval_sums(
    model, batches, device: torch.device, precision: str = "fp32", task: str = "classification",
    logits_mb: float = EVAL_LOGITS_MB, head=None,
) -> torch.Tensor:  # fmt: skip
    """Summed metric vector of `model` over (inputs, labels) batches; leaves the model in eval.

    Labels are (B,) per row, or (B, L) per token for causal-lm (each position a row). Memory is
    bounded by `logits_mb` of float32 logits, whatever the number or length of the rows: a batch's
    rows are forwarded a few at a time (one at least) and their metrics summed chunk by chunk;
    with a causal-lm `head` (stages/train/lm_head.py) the model gives hidden states and the logits are
    made per chunk of tokens, so not even one row's (L x V) logits are built."""
    model.eval()
    total = torch.zeros(sums_size(), dtype=sum_dtype(device), device=device)
    width = head.linear.out_features if head is not None else None
    for x, y in batches:
        n, a = len(y), 0
        while a < n:
            # The first forward is one row: the model's width is not known before it.
            per_row = (x["input_ids"].shape[1] if isinstance(x, dict) else 1) * (width or 0)
            rows = (
                n if head is not None else 1 if not per_row else logits_mb * 2**20 // (4 * per_row)
            )
            b = min(n, a + max(1, int(rows)))
            xs = to_device(_rows(x, a, b), device)
            ys = to_device(y[a:b], device).reshape(-1)
            with autocast(device, precision):
                out = head.hidden(xs) if head is not None else lm.logits(model, xs, task)
            width = width or out.shape[-1]
            chunk = max(1, lm_loss.chunk_tokens(logits_mb, width, "--eval-logits-mb") // 4)
            total += _chunked_sums(out.reshape(len(ys), -1), ys, chunk, device, precision, head)
            a = b
    return total


def _rows(x, a: int, b: int):
    return {k: v[a:b] for k, v in x.items()} if isinstance(x, dict) else x[a:b]


def _chunked_sums(out, labels, chunk: int, device, precision: str, head) -> torch.Tensor:
    """`batch_sums` of logits (or of `head` applied to hidden states) `chunk` rows at a time;
    with a head, only the labeled rows are mapped to logits at all."""
    if head is not None:
        keep = (labels >= 0).nonzero().squeeze(1)  # a sync, in evaluation only
        out, labels = out[keep], labels[keep]
    total = 0
    for a in range(0, len(labels), chunk):
        z = out[a : a + chunk]
        if head is not None:
            with autocast(device, precision):
                z = head.linear(z)
        total = total + batch_sums(z, labels[a : a + chunk])
    return total


def dataset_batches(ds, batch_size: int, rank: int = 0, world: int = 1, task="classification"):
    """(x, labels) over this rank's contiguous share of a map-style data set; for causal-lm the
    labels are each position's next token."""
    lo, hi = span(len(ds), rank, world)
    for a in range(lo, hi, batch_size):
        ids = np.arange(a, min(hi, a + batch_size))
        if task == lm.TASK:
            x = lm.inputs(ds, ids, task)
            yield x, lm.next_token_labels(x["input_ids"], x["attention_mask"], lm.target_mask(x))
        else:
            x, y = get_batch(ds, ids)
            yield x, torch.from_numpy(y)


def has_labels(ds, option: str = "--eval-data") -> None:
    _, y = get_batch(ds, np.arange(min(len(ds), 256)))
    if not (y >= 0).any():
        raise UsageError(f"{option} has no labels in its first {len(y)} rows: pass a labeled split")


class AgreementSet:
    """The first `rows` cached rows (first shards, for speed) and the teacher's top-1 on them:
    one per row, or one per stored token of a causal-lm row (its `length` tokens, packed)."""

    def __init__(self, reader: CacheReader, data, rows: int):
        ids, top, lengths = [], [], []
        self.task = reader.task
        for i in range(len(reader.shards)):
            if sum(map(len, ids)) >= rows:
                break
            cols = reader.read_shard(i, features=False)
            ids.append(cols["sample_id"])
            top.append(reader.codec.teacher_top1(cols))
            lengths.append(cols["length"] if self.task == lm.TASK else np.ones(len(ids[-1])))
        self.ids = np.concatenate(ids)[:rows]
        # Row i's teacher top-1 values are top1[offsets[i]:offsets[i + 1]].
        self.offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths)[:rows])]).astype(int)
        self.top1 = np.concatenate(top)[: self.offsets[-1]]
        self.data = data

    def batches(self, batch_size: int, rank: int = 0, world: int = 1):
        lo, hi = span(len(self.ids), rank, world)
        for a in range(lo, hi, batch_size):
            b = min(hi, a + batch_size)
            x = lm.inputs(self.data, self.ids[a:b], self.task)
            top = self.top1[self.offsets[a] : self.offsets[b]]
            if self.task == lm.TASK:
                yield x, lm.token_labels(lm.target_mask(x), top)
            else:
                yield x, torch.from_numpy(top)


def run(cfg: EvaluateConfig, model, summary: dict, ds, device, reader=None, cache_data=None):
    """Accuracy, ECE and loss of `model` (on `device`) on `ds`; agreement with the teacher of
    the cache `reader` when given, on `cache_data` (the data set its manifest names). A causal-lm
    student (its run's task) is measured per token, with perplexity."""
    task = summary.get("settings", {}).get("task") or "classification"
    if reader is not None and reader.task != task:
        raise UsageError(
            f"--cache {reader.url} holds a {reader.task} teacher but the student is "
            f"{task}: pass the student's store"
        )
    cfg.batch_size = eval_rows(cfg.batch_size, task)
    if (
        task == "regression"
    ):  # MSE, MAE, R² and the same against the teacher (stages/tasks/regression.py)
        return regression.evaluate_run(cfg, model, summary, ds, device, reader, cache_data)
    if task != lm.TASK:
        has_labels(ds, "--data")
    batches = dataset_batches(ds, cfg.batch_size, task=task)
    result = summarise(eval_sums(model, batches, device, cfg.precision, task, cfg.eval_logits_mb))
    if task == lm.TASK:
        result["perplexity"] = lm.perplexity(result["loss"])
    result["agreement"] = None
    if reader is not None:
        check_data(reader, cache_data, cfg.ignore_fingerprint)
        agree = AgreementSet(reader, cache_data, cfg.agree_rows)
        batches = agree.batches(cfg.batch_size)
        sums = eval_sums(model, batches, device, cfg.precision, task, cfg.eval_logits_mb)
        result["agreement"] = summarise(sums)["accuracy"]
    result.update(name=summary.get("name"), student=summary["student"], data=cfg.data)
    return result
