"""Augmentation-consistent soft labels: V seeded views per sample in stage one, replayed in two.

Stage one (`--views V --augment SPEC`) stores row `sample_id * V + view` of the data set as the
teacher's output on `augment(x, row_generator(seed, sample_id, view))`, with the input's hash.
Stage two trains each epoch on one view per sample (`chosen_views`: every view once per V
epochs), re-creates it from the same generator and callable, and checks the hash, so a student
always sees the exact input its soft labels were computed on.

Without a cache of views, `--augment` in stage two augments on the fly (`OnTheFly`): every epoch a
fresh view from (--seed, sample_id, epoch). With a cache that is the naive pairing this module
exists to avoid (soft labels of the plain input, a student on an augmented one); it is kept as a
baseline, and for hard-label and online students, where it is exact.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.stages.common.data import BatchView, get_batch
from kdcache.stages.tasks.targets import TargetView
from kdcache.stages.train.streams import check_data, with_pseudo_labels
from kdcache.storage.errors import FormatError, UsageError
from kdcache.storage.manifest import balanced_shard_rows
from kdcache.storage.shards import decode_table
from kdcache.storage.stream import CacheStream
from kdcache.storage.views import (
    HASH_COLUMN,
    HASH_NAME,
    chosen_views,
    input_hashes,
    row_generator,
)


def header(cfg) -> dict | None:
    """The manifest's `views` (part of the fingerprint), or None without --augment."""
    if cfg.augment is None:
        return None
    return {
        "count": cfg.views,
        "augment": cfg.augment,
        "augment_args": cfg.augment_args,
        "seed": cfg.seed,
        "hash": HASH_NAME,
    }


def shard_rows(samples: int, requested: int, views: int) -> int:
    """Rows per shard: whole samples (all V views of each) per shard, shards of equal size; the
    same as without views when V = 1."""
    return views * balanced_shard_rows(samples, max(1, requested // views))


def replay(augment, x: torch.Tensor, ids, views, seed: int, spec: str) -> torch.Tensor:
    """`augment(x[j], row_generator(seed, ids[j], views[j]))` for every row, stacked (by the
    augmentation's `batch(x, generators)` when it has one: the same bits, one call)."""
    pairs = zip(ids, views, strict=True)
    if callable(batch := getattr(augment, "batch", None)):
        return batch(x, [row_generator(seed, int(i), int(v)) for i, v in pairs])
    out = [augment(x[j], row_generator(seed, int(i), int(v))) for j, (i, v) in enumerate(pairs)]
    if not all(isinstance(o, torch.Tensor) for o in out):
        raise UsageError(f"--augment {spec}: must return a tensor, got {type(out[0]).__name__}")
    if len({(o.shape, o.dtype) for o in out}) > 1:
        raise UsageError(
            f"--augment {spec}: views of one batch differ in shape or dtype "
            f"({out[0].shape} vs others): return a fixed size (e.g. crop then resize)"
        )
    return torch.stack(out)


class ViewBatches(torch.utils.data.Dataset):
    """Stage one's batches by store row: (sample ids, augmented inputs, labels, keys), with keys
    the rows' `view` and `input_hash` columns; `plain` fetches the un-augmented batch."""

    def __init__(self, plain, views: dict, augment):
        self.plain, self.views, self.augment = plain, views, augment

    def __len__(self) -> int:
        return len(self.plain) * self.views["count"]

    def __getitem__(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        ids, view = np.divmod(rows, self.views["count"])
        ids_t, x, y = self.plain[ids]
        x = replay(self.augment, x, ids, view, self.views["seed"], self.views["augment"])
        keys = {"view": view.astype(np.int32), HASH_COLUMN: input_hashes(x)}
        return ids_t, x, y, keys


def batches(ds, cfg, views: dict | None, augment):
    """Stage one's batches by store row: plain (a regression teacher's with its float targets),
    or augmented views of them."""
    plain = (TargetView if cfg.task == "regression" else BatchView)(ds, cfg.data, cfg.task)
    return plain if views is None else ViewBatches(plain, views, augment)


def settle(cfg, reader) -> None:
    """Take the augmentation of a cache of views (its arguments too when none are given);
    refuse another."""
    v = reader.views if reader else None
    if v is None:
        return
    given = (cfg.augment or v["augment"], cfg.augment_args or v["augment_args"])
    if given != (v["augment"], v["augment_args"]):
        raise UsageError(
            f"--augment {given[0]} {given[1]} is not the augmentation of the views in "
            f"{reader.url} ({v['augment']} {v['augment_args']}): drop --augment to replay the "
            "cache's"
        )
    cfg.augment, cfg.augment_args = v["augment"], dict(v["augment_args"])


class ViewStream(CacheStream):
    """Stage two over a cache of views: one view per sample per epoch, replayed and checked.

    Splits, shuffling, workers, ranks and resume are the CacheStream's, counted in samples (the
    V rows of a sample live in one shard): each sample once per epoch. A piece reads its samples'
    V rows and keeps the epoch's chosen one (and its features)."""

    def __init__(
        self, cache, data, *args, augment, check_inputs=True, pseudo_labels=False, **kwargs
    ):
        ignore = kwargs.pop("ignore_fingerprint", False)
        super().__init__(cache, *args, **kwargs)
        check_data(self.reader, data, ignore)
        self.data, self.augment, self.check_inputs = data, augment, check_inputs
        self.pseudo_labels = pseudo_labels
        self.per_sample = self.reader.views["count"]

    def _read(self, piece: tuple[int, int, int]) -> dict[str, np.ndarray]:
        i, a, b = piece
        v = self.per_sample
        cols = decode_table(self.reader.shard_table(i).slice(a * v, (b - a) * v), self.reader.codec)
        keep = cols["view"] == chosen_views(self.seed, self.epoch, cols["sample_id"], v)
        if int(keep.sum()) != b - a:
            raise FormatError(
                f"{self.reader.url} shard {i}: rows are not {v} views per sample; recompute it"
            )
        cols = {k: c[keep] for k, c in cols.items()}
        if self.features:
            first = self.reader.shards[i]["first_row"]
            cols["features"] = self.reader.read_features(first + a * v, first + b * v)[keep]
        return cols

    def __iter__(self):
        spec = self.reader.views["augment"]
        for batch in super().__iter__():
            ids, view = batch["sample_id"].numpy(), batch["view"].numpy()
            x, _ = get_batch(self.data, ids)
            x = replay(self.augment, x, ids, view, self.reader.views["seed"], spec)
            stored = batch.pop(HASH_COLUMN).numpy()
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
            batch["input"] = x
            if self.pseudo_labels:
                with_pseudo_labels(batch, self.reader.codec)
            yield batch


class OnTheFly(torch.utils.data.IterableDataset):
    """A stage-two stream whose inputs are augmented afresh every epoch: the generator of
    (--seed, sample_id, epoch), so a resumed epoch sees the same views."""

    def __init__(self, stream, augment, seed: int, spec: str):
        self.stream, self.augment, self.seed, self.spec = stream, augment, seed, spec

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def num_batches(self, rank: int | None = None) -> int:
        return self.stream.num_batches(rank)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        for batch in self.stream:
            ids = batch["sample_id"].numpy()
            epochs = np.full(len(ids), self.stream.epoch)
            batch["input"] = replay(self.augment, batch["input"], ids, epochs, self.seed, self.spec)
            yield batch


def replay_options(reader, cfg, augment) -> dict:
    """`ViewStream`'s own arguments for a cache of views; {} for a plain cache."""
    if reader.views is None:
        return {}
    return {"augment": augment, "check_inputs": cfg.check_inputs}


def on_the_fly(stream, augment, cfg):
    """`stream` with --augment applied on the fly, unless it already replays a cache's views."""
    if augment is None or isinstance(stream, ViewStream):
        return stream
    return OnTheFly(stream, augment, cfg.seed, cfg.augment)
