"""What every soft-label codec is: one object that owns a codec's columns from teacher to loss.

A codec turns the teacher's tempered logits ``s = z / T`` into Arrow columns (plus the error
statistics the manifest keeps), reads them back as numpy, computes the student's soft loss from a
batch of them, and tells stage two the teacher's top-1. Stage one, the store and stage two only
ever call these methods: nothing outside `storage/codecs/` branches on a codec's name, so a new
codec is one new module that calls `register`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch

from kdcache.storage.errors import UsageError
from kdcache.storage.options import Option

DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
# Tasks whose rows are sequences: the codec's values are per token, stored as one list per row.
SEQUENCE_TASKS = ("causal-lm",)


def id_type(num_classes: int) -> pa.DataType:
    """The smallest unsigned integer type that holds every id below `num_classes`."""
    for t in (pa.uint8(), pa.uint16(), pa.uint32()):
        if num_classes <= 1 << t.bit_width:
            return t
    return pa.uint64()


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

    def fields(self) -> list[pa.Field]:
        """The codec's Parquet columns: per item, wrapped in one list per row for sequences."""
        own = self.token_fields()
        if not self.sequence:
            return own
        return [pa.field(f.name, pa.list_(f.type), nullable=False) for f in own]

    def groups(self) -> list[tuple[str, ...]]:
        """Columns that share an entry axis: all of them (one entry per item) unless a codec
        stores a varying number of entries per item (then `group_counts` says how many)."""
        return [tuple(f.name for f in self.token_fields())]

    def group_counts(self, columns: dict, lengths: np.ndarray) -> list[np.ndarray]:
        """Entries per row of each group in `groups()` (items per row, for the default)."""
        return [lengths]

    def encode(self, s: torch.Tensor, keys: dict | None = None) -> tuple[dict, dict]:
        """Tempered logits (items, C) float32 -> (numpy columns, additive error statistics).
        `keys` holds the items' `sample_id`, `view` and, for sequences, each row's `length`."""
        raise NotImplementedError

    def token_arrays(self, columns: dict[str, np.ndarray]) -> list[pa.Array]:
        """The encoded numpy columns as Arrow arrays, in `token_fields()` order."""
        raise NotImplementedError

    def arrays(self, columns: dict, lengths: np.ndarray | None = None) -> list[pa.Array]:
        """Arrow arrays in `fields()` order; sequence codecs' entries grouped into their rows."""
        flat = self.token_arrays(columns)
        if not self.sequence:
            return flat
        counts = {}
        for names, n in zip(self.groups(), self.group_counts(columns, lengths), strict=True):
            counts.update(dict.fromkeys(names, n))
        return [rows_of(a, counts[f.name]) for a, f in zip(flat, self.token_fields(), strict=True)]

    def summarise(self, totals: dict) -> dict:
        """Store-level means of the codec's statistics (summed over shards in `totals`)."""
        return {}

    # ----------------------------------------------------------------- reading

    def decode(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The codec's columns of a shard table as numpy; a sequence codec's are packed over the
        table's rows in order (row 0's tokens, then row 1's, ...)."""
        out = {}
        for f in self.fields():
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
        """A sequence codec's soft targets for the chunked causal-lm loss (stages/lm_loss.py):
        one of `kdcache.storage.codecs.token_targets`' kinds, row t = the batch's t-th token."""
        raise UsageError(f"the {self.name} codec has no per-token soft targets")

    def teacher_top1(self, columns: dict) -> np.ndarray:
        """The teacher's predicted class per row, int64."""
        raise NotImplementedError

    def teacher_values(self, columns: dict):
        """A regression teacher's raw outputs per row (n, W), from numpy or torch columns."""
        raise UsageError(f"the {self.name} codec does not store a regression teacher's outputs")
