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

from kdcache.storage.options import Option

DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def fixed_list(values: np.ndarray, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    """(n, w) numpy -> Arrow fixed_size_list<w> without a per-row loop."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=arrow_type)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def list_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow fixed_size_list<w> -> (n, w) numpy, zero-copy where Arrow allows."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.list_size
    values = arr.flatten() if arr.offset else arr.values
    return values.to_numpy(zero_copy_only=False).reshape(-1, width)


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
        self.dtype: str = settings["dtype"]
        self.num_classes: int | None = settings.get("num_classes")

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

    def fields(self) -> list[pa.Field]:
        raise NotImplementedError

    def encode(self, s: torch.Tensor) -> tuple[dict[str, np.ndarray], dict]:
        """Tempered logits (B, C) float32 -> (numpy columns, additive error statistics)."""
        raise NotImplementedError

    def arrays(self, columns: dict[str, np.ndarray]) -> list[pa.Array]:
        """The encoded numpy columns as Arrow arrays, in `fields()` order."""
        raise NotImplementedError

    def summarise(self, totals: dict) -> dict:
        """Store-level means of the codec's statistics (summed over shards in `totals`)."""
        return {}

    # ----------------------------------------------------------------- reading

    def decode(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The codec's columns of a shard table as numpy."""
        out = {}
        for f in self.fields():
            col = table.column(f.name)
            out[f.name] = (
                list_to_numpy(col) if pa.types.is_fixed_size_list(f.type) else col.to_numpy()
            )
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

    def teacher_top1(self, columns: dict) -> np.ndarray:
        """The teacher's predicted class per row, int64."""
        raise NotImplementedError
