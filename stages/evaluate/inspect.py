"""`kdcache inspect --deep`: read every row of a store as stage two would, and say what it holds.

The plain summary comes from the manifest alone. The deep pass reads every shard's Parquet file
and feature rows through the reader (so each file is checked against the manifest on the way,
unless `--no-verify-reads`), and counts what a student would train on: rows, labeled rows, and
non-finite stored values (a NaN in a soft label or a feature poisons every student).
"""

from __future__ import annotations

import time

import numpy as np

from kdcache.storage.errors import IntegrityError
from kdcache.storage.reader import CacheReader


def deep_scan(reader: CacheReader) -> dict:
    """Read every row of the store; IntegrityError when the rows contradict the manifest."""
    started = time.perf_counter()
    rows = labeled = nonfinite = 0
    for i, shard in enumerate(reader.shards):
        cols = reader.read_shard(i)
        n = len(cols["sample_id"])
        if n != shard["rows"]:
            raise IntegrityError(
                f"{reader.url}: shard {shard['index']} holds {n} rows, its manifest entry says "
                f"{shard['rows']}: run `kdcache verify {reader.url}`"
            )
        rows += n
        labeled += int((cols["label"] >= 0).sum())
        floats = (v for v in cols.values() if v.dtype.kind == "f")
        nonfinite += sum(int(v.size - np.isfinite(v).sum()) for v in floats)
    checked = len(reader.checker.checked)
    return {
        "rows_read": rows,
        "labeled_rows_read": labeled,
        "nonfinite_values": nonfinite,
        "files_checked": checked if reader.checker.enabled else None,
        "read_seconds": round(time.perf_counter() - started, 3),
    }
