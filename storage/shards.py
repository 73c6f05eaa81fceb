"""Arrow/Parquet encoding of soft-label shards, and decoding them back to numpy without row loops."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def _fixed_list(values: np.ndarray, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=arrow_type)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def soft_label_schema(codec: str, width: int, dtype: str) -> pa.Schema:
    """The Parquet schema a shard must have; `width` is C for dense and k for top-k."""
    value = DTYPES[dtype]
    fields = [pa.field("sample_id", pa.int64(), nullable=False), pa.field("label", pa.int64())]
    if codec == "dense":
        fields.append(pa.field("logits", pa.list_(value, width), nullable=False))
    else:
        fields += [
            pa.field("topk_indices", pa.list_(pa.int32(), width), nullable=False),
            pa.field("topk_logits", pa.list_(value, width), nullable=False),
            pa.field("logsumexp", pa.float32(), nullable=False),
        ]
    return pa.schema(fields)


def encode_table(columns: dict[str, np.ndarray], codec: str, width: int, dtype: str) -> pa.Table:
    """Columns as numpy (labels use -1 for missing) -> an Arrow table of the shard schema."""
    schema = soft_label_schema(codec, width, dtype)
    labels = columns["label"].astype(np.int64)
    arrays = [
        pa.array(columns["sample_id"].astype(np.int64)),
        pa.array(labels, mask=labels < 0),
    ]
    if codec == "dense":
        arrays.append(_fixed_list(columns["logits"].astype(dtype), DTYPES[dtype]))
    else:
        arrays += [
            _fixed_list(columns["topk_indices"].astype(np.int32), pa.int32()),
            _fixed_list(columns["topk_logits"].astype(dtype), DTYPES[dtype]),
            pa.array(columns["logsumexp"].astype(np.float32)),
        ]
    return pa.Table.from_arrays(arrays, schema=schema)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    # Fixed writer settings so that the same rows always give the same bytes (resume relies on it).
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy", row_group_size=16384, write_statistics=False)
    return buf.getvalue()


def _list_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.list_size
    values = arr.flatten() if arr.offset else arr.values
    return values.to_numpy(zero_copy_only=False).reshape(-1, width)


def decode_table(table: pa.Table) -> dict[str, np.ndarray]:
    """A shard table -> numpy columns; missing labels become -1, float16 stays float16."""
    out = {"sample_id": table.column("sample_id").to_numpy()}
    label = table.column("label")
    out["label"] = label.fill_null(-1).to_numpy().astype(np.int64, copy=False)
    for name in ("logits", "topk_indices", "topk_logits"):
        if name in table.column_names:
            out[name] = _list_to_numpy(table.column(name))
    if "logsumexp" in table.column_names:
        out["logsumexp"] = table.column("logsumexp").to_numpy()
    return out
