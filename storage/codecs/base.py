"""What every soft-label codec is: one object that owns a codec's columns from teacher to loss.

A codec turns the teacher's tempered logits ``s = z / T`` into Arrow columns (plus the error
statistics the manifest keeps), reads them back as numpy, computes the student's soft loss from a
batch of them, and tells stage two the teacher's top-1. Stage one, the store and stage two only
ever call these methods: nothing outside `storage/codecs/` branches on a codec's name, so a new
codec is one new module that calls `register`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdcache.storage.errors import UsageError
from kdcache.storage.options import Option
from kdcache.storage.shards import table_to_parquet_bytes

DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
# Tasks whose rows are sequences: the codec's values are per token, stored as one list per row.
SEQUENCE_TASKS = ("causal-lm",)
# Tasks whose stored values are raw outputs (stored at T = 1), not logits of a distribution. These
# two declarations are all the store format knows of tasks; the stages ask `kdcache.stages.tasks`.
VALUE_TASKS = ("regression",)


def id_type(num_classes: int) -> pa.DataType:
    """The smallest unsigned integer type that holds every id below `num_classes`."""
    for t in (pa.uint8(), pa.uint16(), pa.uint32()):
        if num_classes <= 1 << t.bit_width:
            return t
    return pa.uint64()


_TORCH = {
    pa.uint8(): torch.uint8,
    pa.uint16(): torch.uint16,
    pa.uint32(): torch.uint32,
    pa.uint64(): torch.uint64,
    pa.int32(): torch.int32,
    pa.float16(): torch.float16,
    pa.float32(): torch.float32,
}


_SIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def torch_dtype(arrow_type: pa.DataType, device: torch.device | None = None) -> torch.dtype:
    """The torch dtype a column is cast to on `device`, so that it leaves at its stored width.

    Off the CPU, wide unsigned ids travel as the signed type of the same width (CUDA and MPS
    support uint16/32/64 barely or not at all): the same bits, which `token_arrays`' unsigned
    `astype` restores."""
    dtype = _TORCH[arrow_type]
    if device is not None and torch.device(device).type != "cpu":
        return _SIGNED.get(dtype, dtype)
    return dtype


class Workspace:
    """Reusable device buffers for chunked encoding: a chunk's temporaries are allocated once a
    run, not once a chunk (on the CPU a fresh array of 100 MB costs its page faults each time;
    on CUDA the caching allocator would reuse them anyway)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def holds(self, t: torch.Tensor) -> bool:
        """True when `t` lives in one of these buffers (which the next chunk overwrites)."""
        ptr = t.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == ptr for b in self._buffers.values())


class _Fresh(Workspace):
    def get(self, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)


FRESH = _Fresh()  # no reuse: every buffer new (the host `encode`, tests)


def token_keys(keys: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Per-row `sample_id`, `view`, `length` -> per-token int64 `sample_id`, `view`, `position`
    (the token's index among its row's stored tokens) on `device`."""
    lengths = np.asarray(keys["length"], np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    out = {
        "sample_id": np.repeat(np.asarray(keys["sample_id"], np.int64), lengths),
        "view": np.repeat(np.asarray(keys["view"], np.int64), lengths),
        "position": np.arange(int(lengths.sum()), dtype=np.int64) - starts,
    }
    return {k: torch.from_numpy(v).to(device) for k, v in out.items()}


def rows_of(values: pa.Array, counts: np.ndarray) -> pa.ListArray:
    """Flat per-token (or per-draw) values -> one list per row, `counts[r]` entries in row r."""
    offsets = np.zeros(len(counts) + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def fixed_list(values: np.ndarray, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    """(n, w) numpy -> Arrow fixed_size_list<w> without a per-row loop."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=arrow_type)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def list_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow fixed_size_list<w> -> (n, w) numpy, zero-copy where Arrow allows; a list<...> per
    row (a sequence codec's column) is flattened over its rows first."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(arr.type):
        arr = arr.flatten()
    if not pa.types.is_fixed_size_list(arr.type):
        return _widen(arr.to_numpy(zero_copy_only=False))
    width = arr.type.list_size
    values = arr.flatten() if arr.offset else arr.values
    return _widen(values.to_numpy(zero_copy_only=False).reshape(-1, width))


def _widen(a: np.ndarray) -> np.ndarray:
    # Ids are stored in the narrowest unsigned type; torch indexes with int64.
    return a.astype(np.int64) if a.dtype.kind == "u" else a


def largest_fitting(cost, budget: float, lo: int, hi: int) -> int:
    """The largest n in [lo, hi] with cost(n) <= budget, for a cost that grows with n, given
    that lo fits (0 when nothing does): a binary search, each try one call of `cost`."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
    return lo


class Codec:
    """Base of every codec. `settings` is the manifest's ``soft_labels`` object."""

    name: ClassVar[str]
    #: The codec's own user-facing options (flags of `kdcache precompute`), declared once.
    options: ClassVar[tuple[Option, ...]] = ()
    #: Tasks whose teachers this codec can store.
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    #: Keys of the manifest's ``stats`` that `summarise` fills (shown by inspect and the report).
    stats_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: dict, task: str = "classification"):
        self.settings = settings
        self.task = task
        self.sequence = task in SEQUENCE_TASKS
        self.values = task in VALUE_TASKS
        self.dtype: str = settings["dtype"]
        self.num_classes: int | None = settings.get("num_classes")

    @classmethod
    def fit_budget(cls, budget: float, s: torch.Tensor, values: dict) -> dict:
        """Options that fit `budget` stored bytes per token on the teacher's probe logits `s`."""
        raise UsageError(f"--budget-bytes-per-token: the {cls.name} codec has no size to choose")

    # ----------------------------------------------------------------- stage one

    @classmethod
    def configure(cls, values: dict, task: str) -> dict:
        """Validated codec options -> the codec's part of the manifest's ``soft_labels``."""
        out = {}
        for opt in cls.options:
            value = values.get(opt.name, opt.default)
            opt.validate(value)
            out[opt.name] = value
        return out

    def check_classes(self, num_classes: int) -> None:
        """Refuse settings that do not fit the teacher's width (known after its first batch)."""

    def token_fields(self) -> list[pa.Field]:
        """The codec's columns for one item: a sample, or one token of a sequence."""
        raise NotImplementedError

    def stored_token_fields(self) -> list[pa.Field]:
        """The columns for one item as the Parquet file holds them, in `token_fields()` order:
        the same unless a layout codes a column on disk (sampled layout 2's id gaps), which
        `decode` undoes, so that readers and losses only ever see `token_fields()`."""
        return self.token_fields()

    def fields(self) -> list[pa.Field]:
        """The codec's columns as read: per item, wrapped in one list per row for sequences."""
        return self._per_row(self.token_fields())

    def stored_fields(self) -> list[pa.Field]:
        """The codec's Parquet columns (the shard schema's)."""
        return self._per_row(self.stored_token_fields())

    def _per_row(self, own: list[pa.Field]) -> list[pa.Field]:
        if not self.sequence:
            return own
        return [pa.field(f.name, pa.list_(f.type), nullable=False) for f in own]

    def parquet_options(self) -> dict:
        """Writer settings beyond the store's fixed defaults (storage/shards.py), fixed per
        layout so that the same rows always give the same bytes."""
        return {}

    def stored_bytes_per_token(self, columns: dict[str, np.ndarray], tokens: int) -> float:
        """File bytes per token of the codec's own columns for `tokens` encoded tokens (one
        sequence row, `finish`ed columns), written as a shard writes them: the compressed column
        chunks, keys and the file's footer not counted. What `--budget-bytes-per-token` fits;
        a whole shard compresses a little better (more context for the compressor)."""
        arrays = self.arrays(columns, np.array([tokens]))
        table = pa.Table.from_arrays(arrays, schema=pa.schema(self.stored_fields()))
        data = table_to_parquet_bytes(table, self.parquet_options())
        meta = pq.read_metadata(pa.BufferReader(data))
        size = sum(
            meta.row_group(r).column(c).total_compressed_size
            for r in range(meta.num_row_groups)
            for c in range(meta.num_columns)
        )
        return size / max(1, tokens)

    def groups(self) -> list[tuple[str, ...]]:
        """Columns that share an entry axis: all of them (one entry per item) unless a codec
        stores a varying number of entries per item (then `group_counts` says how many)."""
        return [tuple(f.name for f in self.token_fields())]

    def group_counts(self, columns: dict, lengths: np.ndarray) -> list[np.ndarray]:
        """Entries per row of each group in `groups()` (items per row, for the default)."""
        return [lengths]

    def encode(self, s: torch.Tensor, keys: dict | None = None) -> tuple[dict, dict]:
        """Tempered logits (items, C) float32 -> (numpy columns, additive error statistics).
        `keys` holds the items' `sample_id`, `view` and, for sequences, each row's `length`.

        The host form of `encode_device` (tests, small batches): it reads everything back."""
        tokens = token_keys(keys, s.device) if self.sequence and keys is not None else None
        cols, stats, _ = self.encode_device(s, tokens)
        host = self.finish({k: v.cpu().numpy() for k, v in cols.items()})
        return host, {k: v.item() for k, v in stats.items()}

    #: Whether `encode_device` is implemented (a codec written before it only has `encode`).
    on_device: ClassVar[bool] = False

    def work_bytes(self, num_classes: int) -> int:
        """Device bytes per item that `encode_device` holds at once beyond its input chunk."""
        return 4 * num_classes

    def encode_device(
        self, s: torch.Tensor, tokens: dict | None = None, work: Workspace = FRESH
    ) -> tuple:
        """Tempered logits (items, C) float32 on the teacher's device, which the codec may
        overwrite -> (columns as tensors already at their stored widths, on that device;
        statistics as 0-d tensors there; per-item bool tensor, True where `s` was finite).

        Nothing is read back: the caller copies the columns to pinned host memory and reads
        the statistics once per shard. `tokens`: per-token int64 `sample_id`, `view`,
        `position` tensors for sequence codecs (see `token_keys`); `work`: where to take the
        chunk's temporaries from."""
        raise NotImplementedError

    def finish(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host columns from `encode_device` -> the columns `token_arrays` takes (run on the
        writer thread: cheap, O(stored values))."""
        return columns

    def token_arrays(self, columns: dict[str, np.ndarray]) -> list[pa.Array]:
        """The encoded numpy columns as Arrow arrays, in `stored_token_fields()` order."""
        raise NotImplementedError

    def arrays(self, columns: dict, lengths: np.ndarray | None = None) -> list[pa.Array]:
        """Arrow arrays in `stored_fields()` order; a sequence codec's entries grouped into rows."""
        flat = self.token_arrays(columns)
        if not self.sequence:
            return flat
        counts = {}
        for names, n in zip(self.groups(), self.group_counts(columns, lengths), strict=True):
            counts.update(dict.fromkeys(names, n))
        # Groups name the columns as read; a stored column shares its read column's entry axis.
        return [rows_of(a, counts[f.name]) for a, f in zip(flat, self.token_fields(), strict=True)]

    def summarise(self, totals: dict) -> dict:
        """Store-level means of the codec's statistics (summed over shards in `totals`)."""
        return {}

    # ----------------------------------------------------------------- reading

    def decode(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The codec's columns of a shard table as numpy; a sequence codec's are packed over the
        table's rows in order (row 0's tokens, then row 1's, ...)."""
        out = {}
        for f in self.stored_fields():
            col = table.column(f.name)
            nested = pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type)
            out[f.name] = list_to_numpy(col) if nested else col.to_numpy()
        return out

    def label(self) -> str:
        """What a row stores, in a few words (inspect, the report)."""
        return self.name

    def error_text(self, stats: dict) -> str | None:
        """What the codec loses against the full teacher, in words, from the manifest's stats
        (None for a lossless codec)."""
        return None

    def describe(self, stats: dict) -> dict:
        """The codec's lines in `kdcache inspect`: its options and its error statistics."""
        out = {o.name: self.settings.get(o.name) for o in self.options}
        return out | {k: stats.get(k) for k in self.stats_keys}

    # ----------------------------------------------------------------- stage two

    def soft_loss(
        self, student_logits: torch.Tensor, batch: dict, stored_T: float, T: float
    ) -> torch.Tensor:
        """The soft term of the student's loss on one batch (tensors already on its device)."""
        raise NotImplementedError

    @property
    def has_token_targets(self) -> bool:
        """Whether the codec gives the chunked causal-lm loss its targets (else: `soft_loss`)."""
        return type(self).token_targets is not Codec.token_targets

    def token_targets(self, batch: dict, stored_T: float, T: float, num_classes: int, dtype=None):
        """A sequence codec's soft targets for the chunked causal-lm loss (stages/tasks/lm_loss.py):
        one of `kdcache.storage.codecs.token_targets`' kinds, row t = the batch's t-th token."""
        raise UsageError(f"the {self.name} codec has no per-token soft targets")

    def teacher_top1(self, columns: dict) -> np.ndarray:
        """The teacher's predicted class per row, int64."""
        raise NotImplementedError

    def teacher_values(self, columns: dict):
        """A regression teacher's raw outputs per row (n, W), from numpy or torch columns."""
        raise UsageError(f"the {self.name} codec does not store a regression teacher's outputs")
