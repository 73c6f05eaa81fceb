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

    def pieces_of(self, pid: int) -> dict[str, np.ndarray]:
        with self.lock:
            return self.pieces[pid]

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
        for j, names in enumerate(self.groups):
            starts, lens = cols.pop(f"_g{j}_start"), cols.pop(f"_g{j}_len")
            # One index array per piece (rows of a piece are usually most of a batch): entry k of
            # the batch is entry starts[r] + (k - first entry of row r) of its row's piece.
            first = np.concatenate([[0], np.cumsum(lens)[:-1]])
            within = np.arange(int(lens.sum())) - np.repeat(first - starts, lens)
            owner = np.repeat(pids, lens)
            for name in names:
                sample = self.pieces_of(int(pids[0]))[name]
                out = np.empty((len(within), *sample.shape[1:]), sample.dtype)
                for p in np.unique(pids).tolist():
                    at = owner == p
                    out[at] = self.pieces_of(p)[name][within[at]]
                cols[name] = out
        with self.lock:
            for p, n in zip(*np.unique(pids, return_counts=True), strict=True):
                self.left[int(p)] -= int(n)
                if not self.left[int(p)]:
                    del self.pieces[int(p)], self.left[int(p)]
        return cols
