"""Reading a store: open a URL, trust only what the manifest lists, hand out numpy per shard."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from kdcache.storage.codecs import open_codec
from kdcache.storage.errors import FormatError, IntegrityError
from kdcache.storage.fsio import Location, open_location
from kdcache.storage.integrity import CHECKSUMS, CheckedStore, ReadChecker, listed_files
from kdcache.storage.manifest import FEATURES, load_manifest, parquet_key
from kdcache.storage.shards import decode_table, shard_schema

_SLICE = 256 << 10


def _read_into(fh, view: memoryview, hasher=None) -> int:
    """Fill `view` from a file object; the bytes read (fewer only at the end of the file).

    With `hasher`, read in slices of 256 KiB and hash each one while it is still in the CPU cache:
    hashing the whole buffer afterwards reads it from memory again (measured: ~13% of a
    shuffled epoch's CPU time, against about 6% this way)."""
    got, step = 0, _SLICE if hasher is not None else len(view)
    while got < len(view) and (n := fh.readinto(view[got : got + step])):
        if hasher is not None:
            hasher.update(view[got : got + n])
        got += n
    return got


class CacheReader:
    """A complete store, opened read-only.

    `read_shard(i)` is the hot path stage two builds on: one Parquet read and one Zarr slice, turned
    into numpy columns (`sample_id`, `view`, `label` with -1 for missing, the codec's columns, and
    `features` when stored) with no per-row Python. `codec` decodes, scores and describes the
    soft labels; `keys()` is the row -> (sample_id, view) index built from the stored keys.
    Every listed file is checked against the manifest the first time it is read (IntegrityError
    on a mismatch) unless `verify` is false (storage/integrity.py).
    """

    def __init__(
        self, url: str | Location, storage_options: dict | None = None, verify: bool = True
    ):
        self.loc = url if isinstance(url, Location) else open_location(url, storage_options)
        self.url = self.loc.url
        self.manifest = load_manifest(self.loc)
        m = self.manifest
        self.checker = ReadChecker(m, self.url, self.loc.path, enabled=verify)
        self.format: str = m["format"]
        self.soft = m["soft_labels"]
        self.task: str = m.get("task", "classification")
        self.codec = open_codec(self.soft, self.task)
        self.num_classes: int = self.soft["num_classes"]
        self.temperature: float = float(m["temperature"])
        self.features_info: dict | None = m.get("features")
        # A regression store's true targets (`target` column); None in older and other stores.
        self.targets_info: dict | None = m.get("targets")
        self.shards: list[dict] = m["shards"]
        self.num_rows: int = int(m["num_rows"])
        self.fingerprint: str = m["fingerprint"]
        self.data_fingerprint: str = m["data"]["fingerprint"]
        # {"count", "augment", "augment_args", "seed", "hash"} for a store of augmented views.
        self.views: dict | None = m.get("views")
        self._array = None
        self._raw: bool | None = None
        self._keys: tuple[np.ndarray, np.ndarray] | None = None
        self._index: tuple | None = None

    def __len__(self) -> int:
        return self.num_rows

    @property
    def num_samples(self) -> int:
        """Samples of the data set the store covers: rows, or rows / V for V views each."""
        return self.num_rows // (self.views["count"] if self.views else 1)

    @property
    def has_features(self) -> bool:
        return self.features_info is not None

    @property
    def target_rows(self) -> int:
        """Rows with a true target (0 when the store keeps no `target` column)."""
        return int(self.manifest.get("stats", {}).get("target_rows", 0)) if self.targets_info else 0

    @property
    def features(self):
        if self._array is not None and self._array_pid != os.getpid():
            self._array = None  # opened before a fork: its S3 client is not usable here
        if self._array is None and self.has_features:
            self._array_pid = os.getpid()
            self._array = zarr.open_array(store=self._zarr_store(), mode="r")
        return self._array

    def _zarr_store(self):
        where = self.loc.zarr_store + "/" + FEATURES
        if self.loc.is_local:
            store = zarr.storage.LocalStore(where, read_only=True)
        else:
            options = self.loc.storage_options or None
            store = zarr.storage.FsspecStore.from_url(
                where, storage_options=options, read_only=True
            )
        return CheckedStore(store, self.checker if self.checker.enabled else None, FEATURES)

    def _read_file(self, key: str) -> bytes:
        """A listed file's bytes, checked against the manifest on this reader's first read."""
        try:
            data = self.loc.read_bytes(key)
        except FileNotFoundError:
            raise self.checker.missing(key) from None
        self.checker.check(key, data)
        return data

    def _parquet(self, key: str, columns: list[str] | None = None) -> pa.Table:
        data = self._read_file(key)
        try:
            return pq.read_table(io.BytesIO(data), columns=columns)
        except (pa.ArrowException, OSError) as exc:
            # Reached only unchecked (--no-verify-reads, or a store without checksums).
            raise IntegrityError(
                f"{self.loc.path(key)}: unreadable Parquet ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}): run `kdcache verify {self.url}`"
            ) from None

    def schema(self) -> pa.Schema:
        return shard_schema(
            self.codec,
            self.format,
            (self.targets_info or {}).get("width"),
            hashed=self.views is not None,
        )

    def keys(self) -> tuple[np.ndarray, np.ndarray]:
        """(sample_id, view) of every store row, in store order (shard by shard).

        Rows need not be in sample order and a sample may own several rows (views), so this is
        read from the stored key columns (a column projection, not the soft labels), once.
        """
        if self._keys is None:
            ids, views = [], []
            for i in range(len(self.shards)):
                cols = ["sample_id", "view"] if self.format != "kdcache/1" else ["sample_id"]
                t = self._parquet(parquet_key(self.shards[i]["index"]), cols)
                ids.append(t.column("sample_id").to_numpy())
                views.append(
                    t.column("view").to_numpy()
                    if "view" in cols
                    else np.zeros(t.num_rows, np.int32)
                )
            self._keys = (np.concatenate(ids), np.concatenate(views))
        return self._keys

    def rows_of(self, sample_ids: np.ndarray, view: int | np.ndarray = 0) -> np.ndarray:
        """Store rows holding (sample_id, view) for each given sample; KeyError if one is absent."""
        ids, views = self.keys()
        if self._index is None:
            # One int64 key per row, sample-major, so one sort and one searchsorted serve all.
            width = int(views.max(initial=0)) + 1
            key = ids * width + views
            order = np.argsort(key, kind="stable")
            self._index = (width, key[order], order)
        width, sorted_keys, order = self._index
        want_ids = np.asarray(sample_ids, np.int64)
        want_views = np.broadcast_to(np.asarray(view, np.int64), want_ids.shape)
        want = want_ids * width + want_views
        pos = np.searchsorted(sorted_keys, want).clip(0, max(0, len(order) - 1))
        ok = (want_views < width) & (sorted_keys[pos] == want) if len(order) else want < 0
        if not ok.all():
            j = int(np.argmin(ok))
            raise KeyError(
                f"{self.url} has no row for sample_id {want_ids[j]} view {want_views[j]}"
            )
        return order[pos]

    def shard_table(self, index: int) -> pa.Table:
        return self._parquet(parquet_key(self.shards[index]["index"]))

    def iter_record_batches(self, index: int | None = None) -> Iterator[pa.RecordBatch]:
        for i in range(len(self.shards)) if index is None else [index]:
            yield from self.shard_table(i).to_batches()

    def read_features(self, start: int, stop: int) -> np.ndarray:
        if not self.has_features:
            raise FormatError(f"{self.url} stores no features (precompute ran without --features)")
        rows = int(self.manifest["shard_rows"])
        shard = start // rows
        if stop > start and (stop - 1) // rows == shard and self._raw_layout():
            return self._read_rows(shard, start - shard * rows, stop - shard * rows)
        return self.features[start:stop]

    def _raw_layout(self) -> bool:
        """True for the default feature layout: one uncompressed chunk per shard, all columns.

        Rows are then contiguous little-endian values in the chunk file `c/I/0` (Zarr v3's
        `bytes` codec, C order), read with one ranged read into the result instead of through
        zarr's codec pipeline, which costs about twice the time of the read itself.
        """
        if self._raw is None:
            f = self.features_info
            meta = json.loads(self._read_file(f"{FEATURES}/zarr.json"))
            self._raw = (
                meta.get("codecs") == [{"name": "bytes", "configuration": {"endian": "little"}}]
                and meta["chunk_grid"]["configuration"]["chunk_shape"]
                == [self.manifest["shard_rows"], f["dim"]]
                and meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator")
                == "/"
                and meta["data_type"] == f["dtype"]
                and not meta.get("storage_transformers")
            )
        return self._raw

    def _read_rows(self, shard: int, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of one shard's raw feature chunk: a ranged read, or on this reader's first
        read of the chunk the whole file, checked, so the bytes checked are the bytes used."""
        f = self.features_info
        dtype = np.dtype(f["dtype"]).newbyteorder("<")
        index = self.shards[shard]["index"]
        name = f"{FEATURES}/c/{index}/0"
        whole = self.checker.pending(name)
        nbytes = (
            self.checker.listed[name]["bytes"] if whole else (b - a) * f["dim"] * dtype.itemsize
        )
        out = np.empty(nbytes + whole, np.uint8)  # one byte more reveals a longer file
        h = self.checker.hasher(name) if whole else None
        try:
            with self.loc.fs.open(self.loc.path(name), "rb") as fh:
                fh.seek(0 if whole else a * f["dim"] * dtype.itemsize)
                got = _read_into(fh, memoryview(out), h)
        except FileNotFoundError:
            raise self.checker.missing(name) from None
        if whole:
            self.checker.conclude(name, got, h)
        elif got != nbytes:
            raise IntegrityError(
                f"{self.loc.path(name)}: feature chunk is short ({got} of {nbytes} bytes read): "
                f"run `kdcache verify {self.url}`"
            )
        rows = out[:nbytes].view(dtype).reshape(-1, f["dim"])
        rows = rows[a:b] if whole else rows
        return rows.astype(dtype.newbyteorder("="), copy=False)

    def shard_features(self, index: int) -> np.ndarray:
        s = self.shards[index]
        return self.read_features(s["first_row"], s["first_row"] + s["rows"])

    def read_shard(self, index: int, features: bool = True) -> dict[str, np.ndarray]:
        out = decode_table(self.shard_table(index), self.codec)
        if features and self.has_features:
            out["features"] = self.shard_features(index)
        return out

    def verify(self) -> list[str]:
        """Re-hash every file the manifest lists and check schemas and row counts.

        Returns one line per problem, each naming the bad file; empty means the store is sound.
        """

        problems = []
        for key, want in sorted(listed_files(self.manifest).items()):
            if not self.loc.exists(key):
                problems.append(f"{self.loc.path(key)}: missing")
                continue
            got = self.loc.digests(key)
            if any(got[k] != want[k] for k in (*CHECKSUMS, "bytes") if k in want):
                problems.append(
                    f"{self.loc.path(key)}: checksum mismatch (file changed or corrupt)"
                )
        expected = self.schema()
        total = 0
        for shard in self.shards:
            key = parquet_key(shard["index"])
            # A file already reported missing or corrupt has no contents worth checking.
            damaged = any(key in p for p in problems)
            if shard["first_row"] != total:
                problems.append(f"{self.loc.path(key)}: first_row {shard['first_row']} != {total}")
            total += shard["rows"]
            if damaged:
                continue
            try:
                meta = pq.read_metadata(io.BytesIO(self.loc.read_bytes(key)))
            except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
                problems.append(f"{self.loc.path(key)}: unreadable Parquet ({exc})")
                continue
            schema = meta.schema.to_arrow_schema()
            if not schema.equals(expected):
                problems.append(f"{self.loc.path(key)}: schema {schema} != expected {expected}")
            if meta.num_rows != shard["rows"]:
                problems.append(
                    f"{self.loc.path(key)}: {meta.num_rows} rows, manifest says {shard['rows']}"
                )
        if total != self.num_rows:
            problems.append(f"{self.url}: shards hold {total} rows, manifest says {self.num_rows}")
        if self.has_features and not any(FEATURES in p for p in problems):
            shape = tuple(self.features.shape)
            if shape != (self.num_rows, self.features_info["dim"]):
                problems.append(f"{self.loc.path(FEATURES)}: shape {shape} does not match manifest")
        return problems

    def check_integrity(self) -> None:
        problems = self.verify()
        if problems:
            raise IntegrityError("\n".join(problems))
