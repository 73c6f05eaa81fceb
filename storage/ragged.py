"""Rows of varying size in the shuffle buffer: a sequence codec's packed columns stay per piece.

The shuffle buffer moves fixed-width row columns. A sequence store's codec columns are packed over
tokens (and, for some codecs, over draws per token), so each piece's packed columns are parked
here and every row carries where its entries are: the piece, and a start and a count per group of
columns that share an entry axis (`Codec.groups`). A batch's entries are gathered back in the
batch's row order, the contract stage two's losses rely on; a piece is dropped once every one of
its rows has left the buffer.
"""

from __future__ import annotations

import threading

import numpy as np

PIECE = "_piece"


class Parked:
    def __init__(self, codec):
        self.codec = codec
        self.groups = codec.groups()
        self.pieces: dict[int, dict[str, np.ndarray]] = {}
        self.left: dict[int, int] = {}
        self.lock = threading.Lock()  # pieces are parked by the prefetch thread
        self.next = 0

    def park(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A decoded piece -> its row columns plus the references to its parked entries."""
        counts = self.codec.group_counts(cols, cols["length"])
        rows = len(cols["sample_id"])
        store = {name: cols.pop(name) for names in self.groups for name in names}
        for j, n in enumerate(counts):
            n = np.asarray(n, np.int64)
            cols[f"_g{j}_start"] = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
            cols[f"_g{j}_len"] = n
        with self.lock:
            pid = self.next
            self.next += 1
            self.pieces[pid], self.left[pid] = store, rows
        cols[PIECE] = np.full(rows, pid, np.int64)
        return cols

    def gather(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of row columns -> the same rows with their entries packed in row order."""
        pids = cols.pop(PIECE)
        with self.lock:
            stores = [self.pieces[p] for p in pids.tolist()]
        for j, names in enumerate(self.groups):
            starts, lens = cols.pop(f"_g{j}_start"), cols.pop(f"_g{j}_len")
            for name in names:
                parts = [
                    s[name][a : a + n]
                    for s, a, n in zip(stores, starts.tolist(), lens.tolist(), strict=True)
                ]
                cols[name] = np.concatenate(parts) if parts else stores[0][name][:0]
        with self.lock:
            for p, n in zip(*np.unique(pids, return_counts=True), strict=True):
                self.left[int(p)] -= int(n)
                if not self.left[int(p)]:
                    del self.pieces[int(p)], self.left[int(p)]
        return cols
