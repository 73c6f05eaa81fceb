"""Stage two's batches, composed: a `CacheStream` of stored columns (or a `LabelStream` of labeled
rows, without a cache) wrapped by what a run needs, webdataset-style.

    CacheStream (storage: exactly-once splits, seeded order, shuffle buffer, prefetch;
      a store of views: the epoch's chosen view of each sample)
      -> JoinInputs    `input` fetched from --data by sample_id, one batch at a time
      or ReplayViews   `input` re-created from the store's view generator, its hash checked
      -> PseudoLabels  (--pseudo-labels) `label` = the cached teacher's top-1 on every row
      -> OnTheFly      (--augment without views) a fresh augmented view every epoch

Each wrapper keeps the wrapped stream's contract (`set_epoch`, `num_batches`, `len`, `epoch`,
`reader`) and changes one thing about its batches. `build` composes them for a run.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from kdcache.stages import tasks
from kdcache.stages.common.data import data_fingerprint, get_batch
from kdcache.stages.common.views import replay
from kdcache.storage.errors import UsageError
from kdcache.storage.reader import CacheReader
from kdcache.storage.stream import CacheStream, EpochStream
from kdcache.storage.views import HASH_COLUMN, input_hashes

log = logging.getLogger("kdcache.stream")


def check_data(reader: CacheReader, data, ignore_fingerprint: bool = False) -> None:
    """Refuse a `--data` that is not the one the cache was computed from."""
    if len(data) < reader.num_samples:
        raise UsageError(
            f"--data has {len(data)} samples but the cache {reader.url} covers "
            f"{reader.num_samples}: "
            "pass the data set the cache was computed from"
        )
    got = data_fingerprint(data, tasks.get(reader.task).per_token)
    want = reader.data_fingerprint
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


class Wrapper(torch.utils.data.IterableDataset):
    """A stream around another: the same epochs, splits and lengths; `__iter__` changes the
    batches (`batch(b)` by default, one at a time)."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):
        # reader, epoch, seed, batch_size, ...: the wrapped stream's (never this wrapper's own).
        if name == "stream":
            raise AttributeError(name)
        return getattr(self.stream, name)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def num_batches(self, rank: int | None = None) -> int:
        return self.stream.num_batches(rank)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        for b in self.stream:
            yield self.batch(b)

    def batch(self, b: dict) -> dict:
        return b


class JoinInputs(Wrapper):
    """Batches plus `input`: rows of `data` by `sample_id`, after checking `data` is the cache's
    (the vectorised `get_batch`: one fetch per batch)."""

    def __init__(self, stream, data, ignore_fingerprint: bool = False):
        super().__init__(stream)
        check_data(stream.reader, data, ignore_fingerprint)
        self.data, self.task = data, tasks.get(stream.reader.task)

    def batch(self, b):
        b["input"] = self.task.inputs(self.data, b["sample_id"].numpy())
        return b


class ReplayViews(Wrapper):
    """A store of views' batches plus `input`: each row's view re-created from its generator
    (the store's augmentation and seed, the row's sample_id and view) and, with `check_inputs`,
    its hash compared with the one the teacher saw."""

    def __init__(self, stream, data, augment, check_inputs: bool = True,
                 ignore_fingerprint: bool = False):  # fmt: skip
        super().__init__(stream)
        check_data(stream.reader, data, ignore_fingerprint)
        self.data, self.augment, self.check_inputs = data, augment, check_inputs

    def batch(self, b):
        v = self.stream.reader.views
        spec = v["augment"]
        ids, view = b["sample_id"].numpy(), b["view"].numpy()
        x, _ = get_batch(self.data, ids)
        x = replay(self.augment, x, ids, view, v["seed"], spec)
        stored = b.pop(HASH_COLUMN).numpy()
        if self.check_inputs:
            bad = np.flatnonzero(input_hashes(x) != stored)
            if len(bad):
                j = int(bad[0])
                raise UsageError(
                    f"--augment {spec} is not deterministic: sample_id {ids[j]} view "
                    f"{view[j]} re-created differs from the input the teacher saw "
                    f"({len(bad)} of {len(ids)} rows in this batch); it must draw all its "
                    "randomness from the generator it is given (not the global RNG)"
                )
        b["input"] = x
        return b


class PseudoLabels(Wrapper):
    """Every row's `label` becomes the teacher's top-1 class read from the stored columns,
    unlabeled rows included (the pseudo-label baseline)."""

    def batch(self, b):
        codec = self.stream.reader.codec
        stored = {f.name: b[f.name].numpy() for f in codec.fields()}
        b["label"] = torch.from_numpy(codec.teacher_top1(stored))
        return b


class OnTheFly(Wrapper):
    """Inputs augmented afresh every epoch: the generator of (--seed, sample_id, epoch), so a
    resumed epoch sees the same views."""

    def __init__(self, stream, augment, seed: int, spec: str):
        super().__init__(stream)
        self.augment, self.aug_seed, self.spec = augment, seed, spec

    def batch(self, b):
        ids = b["sample_id"].numpy()
        epochs = np.full(len(ids), self.stream.epoch)
        b["input"] = replay(self.augment, b["input"], ids, epochs, self.aug_seed, self.spec)
        return b


def JoinedStream(cache, data, *args, ignore_fingerprint=False, pseudo_labels=False, **kwargs):
    """A cache's batches with their inputs (and `pseudo_labels`): CacheStream -> JoinInputs."""
    s = JoinInputs(CacheStream(cache, *args, **kwargs), data, ignore_fingerprint)
    return PseudoLabels(s) if pseudo_labels else s


def ViewStream(cache, data, *args, augment, check_inputs=True, pseudo_labels=False,
               ignore_fingerprint=False, **kwargs):  # fmt: skip
    """A cache of views' batches, one view per sample per epoch, replayed and checked:
    CacheStream(one_view) -> ReplayViews."""
    stream = CacheStream(cache, *args, one_view=True, **kwargs)
    s = ReplayViews(stream, data, augment, check_inputs, ignore_fingerprint)
    return PseudoLabels(s) if pseudo_labels else s


class LabelStream(EpochStream):
    """The hard-label twin of CacheStream: labeled rows of a map-style data set, no cache.

    Same contract (seeded per-epoch order, exactly once across ranks x workers); the ids are a
    small int array, so the whole epoch is one permutation and no buffer is needed. The task
    says which rows count (`Task.label_rows`: a causal-lm data set's every row, its labels its
    next tokens; with `every_row`, online KD where the teacher labels each row, every row of a
    classification data set too).
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
        task=None,
        every_row: bool = False,
    ):
        super().__init__(batch_size, shuffle, seed, rank, world_size, num_workers)
        self.data = data
        self.task = tasks.get(task) if task is None or isinstance(task, str) else task
        self.labels, self.ids = self.task.label_rows(data, every_row)
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
            yield {
                "sample_id": torch.from_numpy(chunk),
                "label": torch.from_numpy(self.labels[chunk]),
                "input": self.task.inputs(self.data, chunk),
            }


def build(cfg, reader, data, task, augment, rank: int, world: int):
    """The run's stream: its cache's (views replayed) or its labeled rows, then --augment on the
    fly unless the store's views are replayed."""
    common = dict(seed=cfg.seed, rank=rank, world_size=world, num_workers=cfg.num_workers)
    if reader is None:
        # Online KD sees every row, as a cache's student does; hard labels only the labeled.
        stream = LabelStream(data, cfg.batch_size, task=task, every_row=cfg.online, **common)
    else:
        common |= dict(
            buffer_size=cfg.buffer_size, prefetch=cfg.prefetch,
            features=cfg.beta > 0 or cfg.relation is not None,
            ignore_fingerprint=cfg.ignore_fingerprint, pseudo_labels=cfg.pseudo_labels,
        )  # fmt: skip
        if reader.views:
            return ViewStream(reader, data, cfg.batch_size, augment=augment,
                              check_inputs=cfg.check_inputs, **common)  # fmt: skip
        stream = JoinedStream(reader, data, cfg.batch_size, **common)
    return stream if augment is None else OnTheFly(stream, augment, cfg.seed, cfg.augment)
