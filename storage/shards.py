"""Arrow/Parquet encoding of soft-label shards, and decoding them back to numpy without row loops.

A shard's table is the row keys (``sample_id``, ``view``), the data set's ``label``, then the
codec's own columns (`kdcache.storage.codecs`), then, in a regression store that keeps them, the
data set's float ``target`` per row (null where the item had none). `kdcache/1` shards have no ``view`` column: every
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


def target_field(width: int) -> pa.Field:
    return pa.field("target", pa.list_(pa.float32(), width))


def shard_schema(
    codec, version: str = FORMAT, targets: int | None = None, hashed: bool = False
) -> pa.Schema:
    """The Parquet schema a shard of this codec must have in this format version. Rows of a
    sequence codec also carry their `length` (tokens stored), so no padding is ever stored; rows
    of augmented views (`hashed`) the `input_hash` of the input the teacher saw; `targets` is the
    width of a regression store's `target` column (None: no such column)."""
    keys = KEYS_V1 if version == "kdcache/1" else KEYS + ([LENGTH] if codec.sequence else [])
    tail = [] if targets is None else [target_field(targets)]
    return pa.schema(keys + ([HASH_FIELD] if hashed else []) + codec.stored_fields() + tail)


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
    width = None
    if "target" in columns:
        # Missing targets are NaN rows in memory and nulls on disk (finite ones were checked).
        t = np.ascontiguousarray(columns["target"], np.float32)
        width = t.shape[1]
        flat = pa.array(np.nan_to_num(t, nan=0.0).reshape(-1), pa.float32())
        arrays.append(
            pa.FixedSizeListArray.from_arrays(flat, width, mask=pa.array(np.isnan(t).any(1)))
        )
    return pa.Table.from_arrays(arrays, schema=shard_schema(codec, targets=width, hashed=hashed))


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


def table_to_parquet_bytes(table: pa.Table, options: dict | None = None) -> bytes:
    """Fixed writer settings, so that the same rows always give the same bytes (resume relies on
    it); `options` is the codec's layout's own (`Codec.parquet_options`)."""
    buf = io.BytesIO()
    settings = {"compression": "snappy", "row_group_size": 16384, "write_statistics": False}
    pq.write_table(table, buf, **(settings | (options or {})))
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
    if "target" in table.column_names:
        out["target"] = decode_targets(table.column("target"))
    return out


def decode_targets(column) -> np.ndarray:
    """A `target` column -> (n, W) float32 with NaN rows where it is null."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.list_size
    # `.values` keeps the slots of null rows (`flatten()` drops them); a slice shares them.
    values = arr.values.slice(arr.offset * width, len(arr) * width)
    out = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), width)
    missing = arr.is_null().to_numpy(zero_copy_only=False)
    if missing.any():
        out = out.copy()
        out[missing] = np.nan
    return out
