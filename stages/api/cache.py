"""The cache in one's own trainer: a store opened as a map-style torch Dataset (issue 23).

`open_cache(url)` -> `Cache`; `cache.dataset(data)` joins the store's rows with the data set it
was made from (checked by fingerprint, as `kdcache train` does) and item i is sample i's student
inputs plus its stored soft targets; `cache.collate` pads items into a batch that
`kdcache.kd_loss` (stages/api/kd_loss.py) reads. Only causal-lm stores with per-token targets
(sampled, topk, dense) are served: a classifier's store already streams through `kdcache train`.

Random access reads whole shards (one Parquet file each): the `shards_in_memory` most recently
used ones stay decoded, so an order that visits shards one after another (or a store that fits)
reads each shard once per epoch, and a fully random order over a large store re-reads shards.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from kdcache.stages import tasks
from kdcache.stages.common.data import data_fingerprint
from kdcache.stages.tasks import causal_lm as lm
from kdcache.stages.tasks import lm_loss
from kdcache.storage.errors import UsageError
from kdcache.storage.reader import CacheReader
from kdcache.storage.shards import decode_table

IGNORE = -100  # Hugging Face's "not a target" label


@dataclass(frozen=True)
class StoreInfo:
    """What a batch's loss needs to read its stored columns: carried in the batch as `kd`
    (picklable, so DataLoader workers can collate; not a tensor, so trainers leave it alone)."""

    codec: object
    temperature: float
    num_classes: int


class Cache:
    """A complete causal-lm store, opened read-only (every file checked against the manifest on
    first read unless `verify=False`)."""

    def __init__(self, url: str, storage_options: dict | None = None, verify: bool = True):
        self.reader = r = CacheReader(url, storage_options or None, verify=verify)
        if not tasks.get(r.task).per_token:
            raise UsageError(
                f"{r.url} is a {r.task} store: the Python API serves causal-lm stores only; "
                "train a classifier's store with `kdcache train`"
            )
        if not r.codec.has_token_targets:
            raise UsageError(
                f"{r.url}: the {r.codec.name} codec gives no per-token targets for kd_loss; "
                "precompute with --codec sampled, topk or dense"
            )
        if r.views:
            raise UsageError(f"{r.url} stores augmented views: train it with `kdcache train`")
        self.info = StoreInfo(r.codec, r.temperature, r.num_classes)
        self.collate = Collate(self.info)

    @property
    def vocab_size(self) -> int:
        return self.reader.num_classes

    @property
    def temperature(self) -> float:
        return self.reader.temperature

    def __len__(self) -> int:
        return self.reader.num_rows

    def dataset(self, data, shards_in_memory: int = 8) -> CacheDataset:
        return CacheDataset(self, data, shards_in_memory)

    def __repr__(self) -> str:
        r = self.reader
        return f"Cache({r.url!r}, {r.codec.label()}, rows={r.num_rows}, V={r.num_classes})"


def open_cache(url: str, verify: bool = True, **storage_options) -> Cache:
    """The store at `url` (a path or fsspec URL; `storage_options` go to fsspec)."""
    return Cache(url, storage_options, verify)


class CacheDataset(torch.utils.data.Dataset):
    """Item i: sample i's `input_ids`, `attention_mask`, `labels` (the ids, -100 where the mask
    is 0) and the codec's stored columns for its tokens, packed in token order."""

    def __init__(self, cache: Cache, data, shards_in_memory: int = 8):
        r = self.reader = cache.reader
        got = data_fingerprint(data, tokens=True) if len(data) >= r.num_samples else "-"
        if got != r.data_fingerprint:  # the check `kdcache train` makes (stages/train/streams.py)
            made = r.manifest["data"]
            raise UsageError(
                f"data ({len(data)} items, fingerprint {got}) is not the data the cache {r.url} "
                f"was precomputed from ({r.num_samples} samples, fingerprint "
                f"{r.data_fingerprint}, from {made.get('spec')} {made.get('kwargs')}): pass that "
                "data set to cache.dataset()"
            )
        self.data, self.info, self.keep = data, cache.info, max(1, shards_in_memory)
        self.rows = r.rows_of(np.arange(r.num_samples))  # sample i -> store row
        firsts = np.array([s["first_row"] for s in r.shards], np.int64)
        self.shard_of = np.searchsorted(firsts, self.rows, side="right") - 1
        self.offset = self.rows - firsts[self.shard_of]
        self.groups = r.codec.groups()
        self._shards: OrderedDict[int, tuple[dict, list]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def _shard(self, i: int) -> tuple[dict, list]:
        if i in self._shards:
            self._shards.move_to_end(i)
            return self._shards[i]
        cols = decode_table(self.reader.shard_table(i), self.reader.codec)
        counts = self.reader.codec.group_counts(cols, cols["length"])
        starts = [np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64) for n in counts]
        self._shards[i] = (cols, [(s, np.asarray(n)) for s, n in zip(starts, counts, strict=True)])
        while len(self._shards) > self.keep:
            self._shards.popitem(last=False)
        return self._shards[i]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of a cache dataset of {len(self)}")
        x = lm.inputs(self.data, np.array([i]))
        ids, mask = x["input_ids"][0], x["attention_mask"][0]
        # The stored tokens: every real one, or a chat row's targets (kdcache.text_dataset)
        targets = lm.target_mask(x)[0]
        cols, spans = self._shard(int(self.shard_of[i]))
        j = int(self.offset[i])
        if int(cols["length"][j]) != int(targets.sum()):
            raise UsageError(
                f"data item {i} has {int(targets.sum())} target tokens but the cache stores "
                f"{int(cols['length'][j])}: pass the data set this cache was precomputed from"
            )
        if "target_mask" in x:  # HF's labels: token t + 1 is learned where t is a target
            labels = torch.full_like(ids, IGNORE)
            keep = targets[:-1].bool() & mask[1:].bool()
            labels[1:] = torch.where(keep, ids[1:], labels[1:])
        else:
            labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))
        item = {
            "input_ids": ids,
            "attention_mask": mask,
            "target_mask": targets.to(torch.int64),
            "labels": labels,
        }
        for names, (start, count) in zip(self.groups, spans, strict=True):
            a, n = int(start[j]), int(count[j])
            for name in names:
                item[name] = torch.from_numpy(np.array(cols[name][a : a + n]))
        return item


class Collate:
    """Items -> a batch: inputs right-padded (id 0, mask 0, label -100) to the longest, the
    stored columns concatenated in row order (the order the chunked loss reads), `positions`
    (the valid tokens and their next-token labels, selected here on the host so the loss never
    waits on the device) and `kd` (the store's `StoreInfo`)."""

    def __init__(self, info: StoreInfo):
        self.info = info
        self.names = [f.name for f in info.codec.token_fields()]

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(it["input_ids"]) for it in items)

        def pad(key, value):
            out = torch.full((len(items), width), value, dtype=torch.int64)
            for b, it in enumerate(items):
                out[b, : len(it[key])] = it[key]
            return out

        batch = {
            "input_ids": pad("input_ids", 0),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE),
            "target_mask": pad("target_mask", 0),
        }
        for name in self.names:
            batch[name] = torch.cat([it[name] for it in items])
        batch["positions"] = positions(batch["target_mask"], batch["labels"])
        batch["kd"] = self.info
        return batch


def positions(mask: torch.Tensor, labels: torch.Tensor) -> lm_loss.Positions:
    """The stored tokens (`mask`, the target mask: 1 where stored, row order) and the next token's label at each (-1 where
    `labels[t + 1]` is -100 or t is a row's last), from host tensors."""
    nxt = torch.full_like(labels, -1)
    nxt[:, :-1] = labels[:, 1:]
    nxt = nxt.masked_fill(nxt == IGNORE, -1).reshape(-1)
    index = mask.reshape(-1).bool().nonzero().squeeze(1)
    nxt = nxt[index]
    return lm_loss.Positions(index, nxt, len(index), int((nxt >= 0).sum()))
