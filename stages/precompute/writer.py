"""Stage one's writer thread: it takes the encoded teacher batches (`TeacherBatch`, host arrays)
off a bounded queue, finishes their codec columns, and writes and commits each shard, so the
teacher never waits on disk or network. Its first error stops the run.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from kdcache.stages.precompute.device_encode import ShardEnd
from kdcache.stages.precompute.encode import add_stats
from kdcache.storage import faults
from kdcache.storage.writer import StoreWriter


class _Aborted(Exception):
    pass


class WriterThread(threading.Thread):
    """Encodes and publishes shards from a bounded queue; its first error stops the run."""

    def __init__(self, store: StoreWriter, depth: int):
        super().__init__(daemon=True, name="kdcache-writer")
        self.store = store
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.totals: dict = {}

    def put(self, item) -> None:
        while True:
            self.raise_if_failed()
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """The main thread failed: commit the shards already queued whole, leave the open one
        uncommitted, and end the thread."""
        self.stop.set()
        self.join(timeout=60)

    def _get(self):
        # After an abort, what was queued before it still counts: a shard whose last batch and
        # commit signal are queued gets committed (less to redo); the open one never is.
        while True:
            if self.stop.is_set():
                try:
                    return self.q.get_nowait()
                except queue.Empty:
                    raise _Aborted from None
            try:
                return self.q.get(timeout=0.2)
            except queue.Empty:
                continue

    def run(self) -> None:
        # Protocol: a shard index, its batches (`TeacherBatch`), a `ShardEnd` (commit, with the
        # statistics the device summed); a None in place of an index stops. An abort raises
        # inside the open shard, so its partial rows are never committed.
        codec = self.store.codec
        try:
            while (index := self._get()) is not None:
                with self.store.shard(index) as shard:
                    while not isinstance(item := self._get(), ShardEnd):
                        item.wait()  # the batch's non-blocking copies to pinned memory
                        columns = {}
                        if item.chunks:
                            parts = [codec.finish(c) for c in item.chunks]
                            columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                        columns.update(item.columns)
                        add_stats(shard.stats, item.stats)
                        shard.add(columns, item.features)
                        faults.point("precompute.encoded")
                    add_stats(shard.stats, item.stats)
                add_stats(self.totals, shard.stats)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
