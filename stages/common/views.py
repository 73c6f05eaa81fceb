"""Augmentation-consistent soft labels: V seeded views per sample in stage one, replayed in two.

Stage one (`--views V --augment SPEC`) stores row `sample_id * V + view` of the data set as the
teacher's output on `augment(x, row_generator(seed, sample_id, view))`, with the input's hash.
Stage two trains each epoch on one view per sample (`chosen_views`: every view once per V
epochs), re-creates it from the same generator and callable, and checks the hash, so a student
always sees the exact input its soft labels were computed on.

Stage two's side of it is in stages/train/streams.py (`ReplayViews`, over a `CacheStream` that
keeps one view per sample per epoch). Without a cache of views, `--augment` in stage two augments
on the fly (`OnTheFly`): every epoch a
fresh view from (--seed, sample_id, epoch). With a cache that is the naive pairing this module
exists to avoid (soft labels of the plain input, a student on an augmented one); it is kept as a
baseline, and for hard-label and online students, where it is exact.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.stages import tasks
from kdcache.storage.errors import UsageError
from kdcache.storage.manifest import balanced_shard_rows
from kdcache.storage.views import (
    HASH_COLUMN,
    HASH_NAME,
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
    plain = tasks.get(cfg.task).batch_view(ds, cfg.data)
    return plain if views is None else ViewBatches(plain, views, augment)


def settle(cfg, reader) -> dict:
    """The augmentation of a cache of views (its arguments too when none are given) as the
    settings to take; refuse another. {} for any other cache."""
    v = reader.views if reader else None
    if v is None:
        return {}
    given = (cfg.augment or v["augment"], cfg.augment_args or v["augment_args"])
    if given != (v["augment"], v["augment_args"]):
        raise UsageError(
            f"--augment {given[0]} {given[1]} is not the augmentation of the views in "
            f"{reader.url} ({v['augment']} {v['augment_args']}): drop --augment to replay the "
            "cache's"
        )
    return {"augment": v["augment"], "augment_args": dict(v["augment_args"])}
