"""Streaming a store into torch: a seeded, exactly-once, bounded-memory IterableDataset.

Each epoch the shards are put in a seeded order (``(seed, epoch)``) and their rows, concatenated in
that order, are cut into contiguous spans, one per (rank, DataLoader worker) slot, whose lengths
differ by at most one row. A slot reads only the shards its span overlaps, whole (one Parquet GET
and one Zarr slice each), in a prefetch thread that stays ``prefetch`` shards ahead so object-store
latency hides behind training. Rows then pass through a shuffle buffer that is mixed with numpy
permutations per incoming shard, never per sample, in two reused pools; memory is the buffer plus
the prefetched shards, whatever the size of the store. Only stored columns are streamed: stage two
joins the inputs by ``sample_id`` (``kdcache.stages.train.streams.JoinedStream``).

Batches hold at most ``batch_size`` rows. Every slot cuts its span into the same number of
batches (that of the largest slot) of near-equal size, so all ranks take the same number of steps
(DDP needs no uneven-input handling in practice, and resume is exact) and no batch is tiny.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch
import torch.distributed as dist

from kdcache.storage.errors import FormatError, UsageError
from kdcache.storage.ragged import Parked
from kdcache.storage.reader import CacheReader
from kdcache.storage.shards import decode_table
from kdcache.storage.views import chosen_views

_END = object()


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _slot() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this iterator."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def span(total: int, slot: int, slots: int) -> tuple[int, int]:
    """Slot `slot` of `slots` gets rows [lo, hi) of `total`; lengths differ by at most one."""
    return total * slot // slots, total * (slot + 1) // slots


def batch_sizes(rows: int, count: int) -> list[int]:
    """`rows` cut into `count` batches whose sizes differ by at most one (empty ones dropped)."""
    q, r = divmod(rows, count)
    return [q + 1] * r + [q] * (count - r) if q else [1] * r


class _Prefetcher:
    """Runs `read(piece)` for each piece in a thread, at most `depth` results ahead."""

    def __init__(self, read, pieces: list, depth: int):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(read, pieces), daemon=True, name="kdcache-prefetch"
        )
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, read, pieces) -> None:
        try:
            for piece in pieces:
                if not self._put(read(piece)):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            self._put(exc)

    def __iter__(self):
        while (item := self.q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _take(cols: dict, index) -> dict:
    return {k: v[index] for k, v in cols.items()}


def _concat(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: np.concatenate([a[k], b[k]]) for k in b}


def shuffle_buffer(pieces, sizes: list[int], buffer_size: int, rng, shuffle: bool):
    """Batches of the given sizes (dicts of numpy columns) from pieces, through a bounded buffer.

    Shuffled: every incoming piece is appended to the buffer and, when a batch is due, the whole
    lot is permuted at once; batches are cut from the front until about `buffer_size` rows
    remain to mix with the next piece. The buffer and its permuted copy are two pools allocated
    once and reused, and each batch is copied out of them: a fresh buffer-sized array per piece
    cost more in page faults than all the copies. Unshuffled: rows in order. The sizes must add
    up to the rows the pieces hold.
    """
    if not shuffle:
        yield from _in_order(pieces, sizes)
        return
    pool = mixed = None
    m = i = 0
    for piece in pieces:
        p = len(piece["sample_id"])
        if pool is None or m + p > len(pool["sample_id"]):
            rows = max(m + p, buffer_size + max(sizes, default=0) + p)
            pool, mixed = _grow(pool, m, piece, rows), _grow(None, 0, piece, rows)
        for k, v in piece.items():
            pool[k][m : m + p] = v
        m += p
        if i == len(sizes) or m < buffer_size + sizes[i]:
            continue
        _permute(pool, mixed, m, rng)
        a = 0
        while i < len(sizes) and m - a - sizes[i] >= buffer_size:
            yield {k: v[a : a + sizes[i]].copy() for k, v in mixed.items()}
            a, i = a + sizes[i], i + 1
        for k, v in mixed.items():
            pool[k][: m - a] = v[a:m]
        m -= a
    if not m:
        return
    _permute(pool, mixed, m, rng)
    a = 0
    for size in sizes[i:]:
        yield {k: v[a : a + size].copy() for k, v in mixed.items()}
        a += size


def _grow(pool: dict | None, m: int, like: dict, rows: int) -> dict:
    new = {k: np.empty((rows, *v.shape[1:]), dtype=v.dtype) for k, v in like.items()}
    for k, v in (pool or {}).items():
        new[k][:m] = v[:m]
    return new


def _permute(pool: dict, out: dict, m: int, rng) -> None:
    perm = rng.permutation(m)
    for k, v in pool.items():
        # mode="clip": with the default "raise" numpy buffers `out`, a hidden allocation.
        np.take(v[:m], perm, axis=0, out=out[k][:m], mode="clip")


def _in_order(pieces, sizes: list[int]):
    buf, i = None, 0
    for piece in pieces:
        buf = _concat(buf, piece)
        a, n = 0, len(buf["sample_id"])
        while i < len(sizes) and n - a >= sizes[i]:
            yield _take(buf, slice(a, a + sizes[i]))
            a, i = a + sizes[i], i + 1
        buf = _take(buf, slice(a, n))


class EpochStream(torch.utils.data.IterableDataset):
    """What both streams share: the epoch, the slot split and the batch count."""

    def __init__(self, batch_size, shuffle, seed, rank, world_size, num_workers):
        if batch_size < 1:
            raise UsageError(f"--batch-size {batch_size} must be >= 1")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = _world(rank, world_size)
        self.num_workers = num_workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed the order; call before each epoch (DataLoader workers get a fresh copy)."""
        self.epoch = epoch

    def _rows(self) -> int:
        raise NotImplementedError

    def _sizes(self, rows: int, slots: int) -> list[int]:
        # Every slot makes the same number of batches (that of the largest slot), so every rank
        # takes the same number of optimizer steps; sizes differ by at most one row, so no batch
        # is tiny (batch norm cannot train on one row). Batches hold at most batch_size rows.
        largest = -(-self._rows() // slots)
        return batch_sizes(rows, max(1, -(-largest // self.batch_size)))

    def num_batches(self, rank: int | None = None) -> int:
        """Batches `rank` yields per epoch, given `num_workers` (the count passed at construction)."""
        rank = self.rank if rank is None else rank
        w = max(1, self.num_workers)
        slots = self.world_size * w
        total = 0
        for s in range(rank * w, rank * w + w):
            lo, hi = span(self._rows(), s, slots)
            total += len(self._sizes(hi - lo, slots))
        return total

    def __len__(self) -> int:
        # Exact when the DataLoader's num_workers equals the one given here; the split itself
        # always follows the real worker count, so coverage never depends on this number.
        return self.num_batches()

    def _my_span(self) -> tuple[int, int, list[int], np.random.Generator]:
        worker, workers = _slot()
        slot, slots = self.rank * workers + worker, self.world_size * workers
        rng = np.random.default_rng([self.seed, self.epoch, slot])
        lo, hi = span(self._rows(), slot, slots)
        return lo, hi, self._sizes(hi - lo, slots), rng


class CacheStream(EpochStream):
    """Batches of a store as dicts of tensors, each row once per epoch across ranks x workers.

    Keys: `sample_id` int64, `view`, `label` int64 (-1 missing), the codec's columns as stored,
    `features` as stored (float16 stays float16) when `features` is true and the store has them.
    A sequence store's rows also carry `length`, and its codec columns come packed over the
    batch's tokens in row order (`storage/ragged.py`).
    `len()` is the number of batches this rank yields (exact when `num_workers` matches the
    DataLoader's). Wrap it as `DataLoader(stream, batch_size=None, num_workers=...)`.
    """

    def __init__(
        self,
        cache: str | CacheReader,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        buffer_size: int = 16384,
        prefetch: int = 2,
        storage_options: dict | None = None,
        features: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        one_view: bool = False,
    ):
        super().__init__(batch_size, shuffle, seed, rank, world_size, num_workers)
        if buffer_size < 0 or prefetch < 1:
            raise UsageError(
                f"--buffer-size {buffer_size} must be >= 0, --prefetch {prefetch} >= 1"
            )
        self.reader = (
            cache if isinstance(cache, CacheReader) else CacheReader(cache, storage_options)
        )
        self.buffer_size, self.prefetch = buffer_size, prefetch
        self.features = bool(features) and self.reader.has_features
        # Rows per sample: an epoch counts samples, and a store of V views has V rows each. With
        # `one_view` an epoch reads each sample's V rows (one shard holds them) and keeps the
        # epoch's chosen one (`chosen_views`: every view once per V epochs).
        views = self.reader.views if one_view else None
        self.per_sample = views["count"] if views else 1
        self._parked: Parked | None = None  # per iteration, for sequence stores

    def __getstate__(self) -> dict:
        # The open Zarr array is per process; workers reopen it lazily.
        state = dict(self.__dict__)
        reader = object.__new__(CacheReader)
        reader.__dict__.update(self.reader.__dict__, _array=None)
        state["reader"] = reader
        state["_parked"] = None
        return state

    def _rows(self) -> int:
        return self.reader.num_rows // self.per_sample

    def shard_order(self, epoch: int | None = None) -> list[int]:
        n = len(self.reader.shards)
        if not self.shuffle:
            return list(range(n))
        epoch = self.epoch if epoch is None else epoch
        return np.random.default_rng([self.seed, epoch]).permutation(n).tolist()

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(shard, first, stop) row ranges, in epoch order, that cover global rows [lo, hi)
        (in samples: a range of a store of views stands for all V rows of its samples)."""
        out, offset = [], 0
        for i in self.shard_order():
            rows = self.reader.shards[i]["rows"] // self.per_sample
            a, b = max(lo, offset), min(hi, offset + rows)
            if a < b:
                out.append((i, a - offset, b - offset))
            offset += rows
        return out

    def _read(self, piece: tuple[int, int, int]) -> dict[str, np.ndarray]:
        if self.per_sample > 1:
            return self._read_views(piece)
        i, a, b = piece
        table = self.reader.shard_table(i)
        if (a, b) != (0, table.num_rows):
            table = table.slice(a, b - a)
        cols = decode_table(table, self.reader.codec)
        if self.features:
            first = self.reader.shards[i]["first_row"]
            cols["features"] = self.reader.read_features(first + a, first + b)
        return self._parked.park(cols) if self._parked is not None else cols

    def _read_views(self, piece: tuple[int, int, int]) -> dict[str, np.ndarray]:
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

    def _to_torch(self, cols: dict) -> dict[str, torch.Tensor]:
        if self._parked is not None:
            cols = self._parked.gather(cols)
        # Unshuffled batches can be views of Arrow's read-only buffers: torch needs its own copy.
        return {
            k: torch.from_numpy(np.ascontiguousarray(v) if v.flags.writeable else v.copy())
            for k, v in cols.items()
        }

    def __iter__(self):
        lo, hi, sizes, rng = self._my_span()
        self._parked = Parked(self.reader.codec) if self.reader.codec.sequence else None
        fetch = _Prefetcher(self._read, self.pieces(lo, hi), self.prefetch)
        try:
            for cols in shuffle_buffer(fetch, sizes, self.buffer_size, rng, self.shuffle):
                yield self._to_torch(cols)
        finally:
            fetch.close()
