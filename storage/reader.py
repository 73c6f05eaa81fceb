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
from kdcache.storage.manifest import FEATURES, load_manifest, parquet_key
from kdcache.storage.shards import decode_table, shard_schema


class CacheReader:
    """A complete store, opened read-only.

    `read_shard(i)` is the hot path stage two builds on: one Parquet read and one Zarr slice, turned
    into numpy columns (`sample_id`, `view`, `label` with -1 for missing, the codec's columns, and
    `features` when stored) with no per-row Python. `codec` decodes, scores and describes the
    soft labels; `keys()` is the row -> (sample_id, view) index built from the stored keys.
    """

    def __init__(self, url: str | Location, storage_options: dict | None = None):
        self.loc = url if isinstance(url, Location) else open_location(url, storage_options)
        self.url = self.loc.url
        self.manifest = load_manifest(self.loc)
        m = self.manifest
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
        self._array = None
        self._raw: bool | None = None
        self._keys: tuple[np.ndarray, np.ndarray] | None = None
        self._index: tuple | None = None

    def __len__(self) -> int:
        return self.num_rows

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
            self._array = zarr.open_array(
                store=self.loc.zarr_store + "/" + FEATURES,
                mode="r",
                storage_options=self.loc.storage_options or None,
            )
        return self._array

    def schema(self) -> pa.Schema:
        return shard_schema(self.codec, self.format, (self.targets_info or {}).get("width"))

    def keys(self) -> tuple[np.ndarray, np.ndarray]:
        """(sample_id, view) of every store row, in store order (shard by shard).

        Rows need not be in sample order and a sample may own several rows (views), so this is
        read from the stored key columns (a column projection, not the soft labels), once.
        """
        if self._keys is None:
            ids, views = [], []
            for i in range(len(self.shards)):
                data = self._listed_bytes(parquet_key(self.shards[i]["index"]))
                cols = ["sample_id", "view"] if self.format != "kdcache/1" else ["sample_id"]
                t = pq.read_table(io.BytesIO(data), columns=cols)
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
        data = self._listed_bytes(parquet_key(self.shards[index]["index"]))
        return pq.read_table(io.BytesIO(data))

    def _missing(self, key: str) -> IntegrityError:
        return IntegrityError(
            f"{self.loc.path(key)} is listed in the manifest of {self.url} but missing: the "
            f"store is damaged; `kdcache verify {self.url}` lists every problem, then recompute "
            "it with `kdcache precompute --force`"
        )

    def _listed_bytes(self, key: str) -> bytes:
        try:
            return self.loc.read_bytes(key)
        except FileNotFoundError:
            raise self._missing(key) from None

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
            meta = json.loads(self.loc.read_bytes(FEATURES, "zarr.json"))
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
        """Rows [a, b) of one shard's raw feature chunk."""
        f = self.features_info
        out = np.empty((b - a, f["dim"]), dtype=np.dtype(f["dtype"]).newbyteorder("<"))
        view = memoryview(out).cast("B")
        rel = f"{FEATURES}/c/{self.shards[shard]['index']}/0"
        key = self.loc.path(rel)
        try:
            fh = self.loc.fs.open(key, "rb")
        except FileNotFoundError:
            raise self._missing(rel) from None
        with fh:
            fh.seek(a * f["dim"] * out.itemsize)
            got = 0
            while got < len(view) and (n := fh.readinto(view[got:])):
                got += n
        if got != len(view):
            raise IntegrityError(f"{key}: feature chunk is short ({got} of {len(view)} bytes read)")
        return out.astype(out.dtype.newbyteorder("="), copy=False)

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
        listed = dict(self.manifest.get("files", {}))
        for shard in self.shards:
            listed.update(shard["files"])
        for key, want in sorted(listed.items()):
            if not self.loc.exists(key):
                problems.append(f"{self.loc.path(key)}: missing")
                continue
            digest, size = self.loc.sha256(key)
            if digest != want["sha256"] or size != want["bytes"]:
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
