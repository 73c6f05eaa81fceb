"""Arrow/Parquet encoding of soft-label shards, and decoding them back to numpy without row loops.

A shard's table is the row keys (``sample_id``, ``view``), the data set's ``label``, then the
codec's own columns (`kdcache.storage.codecs`). `kdcache/1` shards have no ``view`` column: every
row is view 0 of the sample it names.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.storage.manifest import FORMAT
from kdcache.storage.views import HASH_COLUMN, HASH_FIELD

KEYS_V1 = [pa.field("sample_id", pa.int64(), nullable=False), pa.field("label", pa.int64())]
KEYS = [
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("view", pa.int32(), nullable=False),
    pa.field("label", pa.int64()),
]


LENGTH = pa.field("length", pa.int32(), nullable=False)


def shard_schema(codec, version: str = FORMAT, hashed: bool = False) -> pa.Schema:
    """The Parquet schema a shard of this codec must have in this format version. Rows of a
    sequence codec also carry their `length` (tokens stored), so no padding is ever stored; rows
    of augmented views (`hashed`) the `input_hash` of the input the teacher saw."""
    keys = KEYS_V1 if version == "kdcache/1" else KEYS + ([LENGTH] if codec.sequence else [])
    return pa.schema(keys + ([HASH_FIELD] if hashed else []) + codec.fields())


def encode_table(columns: dict[str, np.ndarray], codec) -> pa.Table:
    """Numpy columns (labels use -1 for missing; ``view`` defaults to 0; ``input_hash`` only in
    stores of augmented views) -> a shard table."""
    ids = columns["sample_id"].astype(np.int64)
    labels = columns["label"].astype(np.int64)
    view = columns.get("view")
    view = np.zeros(len(ids), np.int32) if view is None else view.astype(np.int32)
    arrays = [pa.array(ids), pa.array(view), pa.array(labels, mask=labels < 0)]
    lengths = None
    if codec.sequence:
        lengths = columns["length"].astype(np.int32)
        arrays.append(pa.array(lengths))
    hashed = HASH_COLUMN in columns
    if hashed:
        arrays.append(pa.array(columns[HASH_COLUMN].astype(np.uint64)))
    arrays += codec.arrays(columns, lengths)
    return pa.Table.from_arrays(arrays, schema=shard_schema(codec, hashed=hashed))


def payload_bytes(table: pa.Table) -> int:
    """Bytes of the values a shard stores (keys, label, codec columns at their stored widths),
    before container overhead or compression: what `bytes_per_sample` counts. List offsets and
    validity bitmaps are bookkeeping, not payload."""
    total = 0
    for col in table.columns:
        arr = col.combine_chunks()
        while pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
            arr = arr.flatten()
        total += len(arr) * (arr.type.bit_width // 8)
    return total


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    # Fixed writer settings so that the same rows always give the same bytes (resume relies on it).
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy", row_group_size=16384, write_statistics=False)
    return buf.getvalue()


def decode_table(table: pa.Table, codec) -> dict[str, np.ndarray]:
    """A shard table -> numpy columns; missing labels become -1, float16 stays float16."""
    ids = table.column("sample_id").to_numpy()
    out = {"sample_id": ids}
    if "view" in table.column_names:
        out["view"] = table.column("view").to_numpy()
    else:
        out["view"] = np.zeros(len(ids), np.int32)
    out["label"] = table.column("label").fill_null(-1).to_numpy().astype(np.int64, copy=False)
    for name in ("length", HASH_COLUMN):
        if name in table.column_names:
            out[name] = table.column(name).to_numpy()
    out.update(codec.decode(table))
    return out
