"""Stage two's batches: the store's columns joined with their inputs, or labeled rows alone.

`JoinedStream` is a `CacheStream` (stored columns, exactly-once splits, seeded order, shuffle
buffer, prefetch) whose batches also carry `input`, fetched from `--data` by `sample_id` one batch
at a time with the vectorised `get_batch`. `LabelStream` is its hard-label twin, without a cache.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from kdcache.stages.common.data import data_fingerprint, get_batch
from kdcache.stages.tasks import causal_lm as lm
from kdcache.storage.errors import UsageError
from kdcache.storage.reader import CacheReader
from kdcache.storage.stream import CacheStream, EpochStream

log = logging.getLogger("kdcache.stream")


class JoinedStream(CacheStream):
    """CacheStream batches plus `input` from `data`, after checking `data` is the cache's.

    With `pseudo_labels` every row's `label` is the teacher's top-1 class read from the stored
    columns, unlabeled rows included (the pseudo-label baseline)."""

    def __init__(
        self, cache, data, *args, ignore_fingerprint: bool = False, pseudo_labels=False, **kwargs
    ):
        super().__init__(cache, *args, **kwargs)
        check_data(self.reader, data, ignore_fingerprint)
        self.data, self.pseudo_labels = data, pseudo_labels

    def __iter__(self):
        for batch in super().__iter__():
            batch["input"] = lm.inputs(self.data, batch["sample_id"].numpy(), self.reader.task)
            if self.pseudo_labels:
                with_pseudo_labels(batch, self.reader.codec)
            yield batch


def with_pseudo_labels(batch: dict, codec) -> None:
    """Every row's `label` becomes the teacher's top-1 class read from the stored columns."""
    stored = {f.name: batch[f.name].numpy() for f in codec.fields()}
    batch["label"] = torch.from_numpy(codec.teacher_top1(stored))


def check_data(reader: CacheReader, data, ignore_fingerprint: bool = False) -> None:
    """Refuse a `--data` that is not the one the cache was computed from."""
    if len(data) < reader.num_samples:
        raise UsageError(
            f"--data has {len(data)} samples but the cache {reader.url} covers "
            f"{reader.num_samples}: "
            "pass the data set the cache was computed from"
        )
    got, want = data_fingerprint(data, reader.task), reader.data_fingerprint
    if got == want:
        return
    source = reader.manifest["data"]
    if not ignore_fingerprint:
        raise UsageError(
            f"--data does not match the cache {reader.url}: data fingerprint {got} != the cache's "
            f"{want} (made from {source.get('spec')} {source.get('kwargs')}); pass that data set, "
            "or --ignore-fingerprint to train anyway"
        )
    log.warning(
        "--ignore-fingerprint: --data (fingerprint %s) is NOT the data the cache %s was made from "
        "(%s); soft labels may not belong to these inputs",
        got,
        reader.url,
        want,
    )


class LabelStream(EpochStream):
    """The hard-label twin of CacheStream: labeled rows of a map-style data set, no cache.

    Same contract (seeded per-epoch order, exactly once across ranks x workers); the ids are a
    small int array, so the whole epoch is one permutation and no buffer is needed. Every row of
    a causal-lm data set is used (its labels are its next tokens), and with `every_row` (online
    KD, where the teacher labels each row) every row of a classification data set too.
    """

    def __init__(
        self,
        data,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        chunk: int = 8192,
        task: str = "classification",
        every_row: bool = False,
    ):
        super().__init__(batch_size, shuffle, seed, rank, world_size, num_workers)
        self.data, self.task = data, task
        if task == lm.TASK:
            self.labels = np.full(len(data), -1, np.int64)
            self.ids = np.arange(len(data), dtype=np.int64)
            return
        labels = [
            get_batch(data, np.arange(a, min(len(data), a + chunk)))[1]
            for a in range(0, len(data), chunk)
        ]
        self.labels = np.concatenate(labels)
        self.ids = np.flatnonzero(every_row | (self.labels >= 0)).astype(np.int64)
        if not len(self.ids):
            raise UsageError("--data has no labeled rows: without --cache the student needs labels")

    def _rows(self) -> int:
        return len(self.ids)

    def __iter__(self):
        lo, _, sizes, _ = self._my_span()
        ids = self.ids
        if self.shuffle:
            ids = ids[np.random.default_rng([self.seed, self.epoch]).permutation(len(ids))]
        for a, size in zip(np.cumsum([lo, *sizes]), sizes, strict=False):
            chunk = ids[a : a + size]
            x = lm.inputs(self.data, chunk, self.task)
            yield {
                "sample_id": torch.from_numpy(chunk),
                "label": torch.from_numpy(self.labels[chunk]),
                "input": x,
            }
