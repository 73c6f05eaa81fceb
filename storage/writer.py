"""Writing a store: prepare it, write shards (each a context manager), publish the manifest last.

Every shard is durable and has its commit marker (`_commits/part-NNNNN.json`, holding the shard's
file hashes and the run fingerprint) before it counts; the manifest is built only from markers, so
several ranks can write disjoint shards and rank 0 can publish after a barrier. A rerun with the
same fingerprint keeps every committed shard and rewrites the rest.
"""

from __future__ import annotations

import numpy as np
import zarr

from kdcache.storage import faults
from kdcache.storage.codecs import open_codec
from kdcache.storage.errors import UsageError
from kdcache.storage.fsio import Location
from kdcache.storage.integrity import digests
from kdcache.storage.manifest import (
    COMMITS,
    FEATURES,
    FINGERPRINT_FIELDS,
    LOCK_FILE,
    MANIFEST,
    RUN_FILE,
    SOFT_LABELS,
    diff,
    dumps,
    load_manifest,
    now_iso,
    parquet_key,
    read_json,
    shard_name,
)
from kdcache.storage.shards import encode_table, payload_bytes, table_to_parquet_bytes


def feature_chunk_keys(index: int, dim: int, chunk_cols: int) -> list[str]:
    return [f"{FEATURES}/c/{index}/{j}" for j in range(-(-dim // chunk_cols))]


def existing_state(loc: Location, header: dict) -> str:
    """'empty', 'complete' (same fingerprint: a cache hit) or 'partial' (same fingerprint).

    Anything else is refused, naming the fields that differ; `--force` handles that case upstream.
    """
    old = load_manifest(loc) if loc.exists(MANIFEST) else read_json(loc, RUN_FILE)
    if old is None:
        foreign = [n for n in loc.listdir() if not n.startswith("_")]
        if foreign:
            raise UsageError(
                f"{loc.url} is not empty and is not a kdcache store ({', '.join(foreign[:3])} ...): "
                "choose a new or empty --out"
            )
        return "empty"
    if old.get("fingerprint") != header["fingerprint"]:
        changes = diff(_settings(old), _settings(header))
        raise UsageError(
            f"{loc.url} holds a cache made with other settings ("
            + "; ".join(changes or ["fingerprint"])
            + "): use another --out, or --force to replace it"
        )
    return "complete" if loc.exists(MANIFEST) else "partial"


def wipe(loc: Location) -> None:
    """Remove a store, manifest first so that it never looks complete while half deleted."""
    loc.remove(MANIFEST)
    faults.point("writer.wipe")
    for name in (COMMITS, SOFT_LABELS, FEATURES, RUN_FILE):
        loc.remove(name, recursive=True)
        faults.point(f"writer.wipe.{name}")


# Sizes learnt from the teacher's first batch, not chosen by the user: left out of "what differs".
_DERIVED = {"num_classes", "dim", "chunk_cols", "path", "checkpoint", "width"}


def _settings(doc: dict) -> dict:
    out = {}
    for key in FINGERPRINT_FIELDS:  # what decides a store's bytes is what can differ
        value = doc.get(key)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _DERIVED}
        out[key] = value
    return out


class StoreWriter:
    """Owns one store's layout: the run header, the feature array, commits and the manifest."""

    def __init__(self, loc: Location, header: dict, conditions: dict | None = None):
        self.loc = loc
        self.header = header
        # What else decided this process's bytes (threads, device, software): recorded in each
        # marker it writes, never fingerprinted (a resume elsewhere stays a valid store).
        self.conditions = conditions
        self.features = header.get("features")
        self.codec = open_codec(header["soft_labels"], header.get("task", "classification"))
        self._array = None

    def prepare(self) -> None:
        """Write the run header and create the feature array (rank 0 only, before the barrier)."""
        self.loc.fs.makedirs(self.loc.root, exist_ok=True)
        # Not the lock's: another process may be writing its lock attempt right now.
        self.loc.sweep_temporaries(keep=LOCK_FILE)
        faults.point("writer.swept")
        self.loc.write_bytes(dumps(self.header), RUN_FILE)
        faults.point("writer.run_header")
        if self.features and not self.loc.exists(FEATURES, "zarr.json"):
            f = self.features
            zarr.create_array(
                store=self.loc.zarr_store + "/" + FEATURES,
                shape=(self.header["num_rows"], f["dim"]),
                chunks=(self.header["shard_rows"], f["chunk_cols"]),
                dtype=f["dtype"],
                compressors="auto" if f.get("compression") == "zstd" else None,
                fill_value=0,
                # A chunk of zeros must still be a file, or its hash could not be checked.
                config={"write_empty_chunks": True},
                storage_options=self.loc.storage_options or None,
                overwrite=True,
            )
            faults.point("writer.features_array")

    @property
    def array(self):
        if self._array is None and self.features:
            self._array = zarr.open_array(
                store=self.loc.zarr_store + "/" + FEATURES,
                mode="r+",
                storage_options=self.loc.storage_options or None,
            )
        return self._array

    def markers(self) -> dict[int, dict]:
        """Shard index -> commit marker for every shard committed under this run's fingerprint."""
        out = {}
        for name in self.loc.listdir(COMMITS):
            if not name.endswith(".json"):
                continue
            marker = read_json(self.loc, f"{COMMITS}/{name}")
            if marker and marker.get("fingerprint") == self.header["fingerprint"]:
                out[marker["entry"]["index"]] = marker
        return out

    def committed(self) -> dict[int, dict]:
        """Shard index -> entry for every shard committed under this run's fingerprint."""
        return {i: m["entry"] for i, m in self.markers().items()}

    def shard(self, index: int) -> ShardWriter:
        return ShardWriter(self, index)

    def publish(self, stats: dict, extra: dict | None = None) -> dict:
        """Check every shard is committed, then write the manifest as the last, atomic step."""
        markers = self.markers()
        entries = {i: m["entry"] for i, m in markers.items()}
        n = self.header["num_rows"]
        expected = -(-n // self.header["shard_rows"])
        missing = sorted(set(range(expected)) - set(entries))
        if missing:
            raise RuntimeError(f"cannot publish {self.loc.url}: shards {missing[:5]} not committed")
        files = {}
        if self.features:
            files[f"{FEATURES}/zarr.json"] = self.loc.digests(FEATURES, "zarr.json")
        manifest = {
            **self.header,
            **(extra or {}),
            "created": now_iso(),
            "files": files,
            "shards": [entries[i] for i in range(expected)],
            "stats": stats,
        }
        # Each distinct set of conditions the shards were computed under, in shard order: more
        # than one says the store was resumed elsewhere (valid, not byte-identical to one run).
        seen = [m["conditions"] for _, m in sorted(markers.items()) if "conditions" in m]
        if seen:
            manifest["conditions"] = [c for i, c in enumerate(seen) if c not in seen[:i]]
        faults.point("publish.checked")
        self.loc.write_bytes(dumps(manifest), MANIFEST)
        faults.point("publish.done")
        return manifest


class ShardWriter:
    """Collects one shard's rows; on a clean exit writes its files and then its commit marker."""

    def __init__(self, store: StoreWriter, index: int):
        self.store = store
        self.index = index
        self.first_row = index * store.header["shard_rows"]
        self._columns: list[dict[str, np.ndarray]] = []
        self._features: list[np.ndarray] = []
        self.stats: dict = {}

    def add(self, columns: dict[str, np.ndarray], features: np.ndarray | None = None) -> None:
        self._columns.append(columns)
        if features is not None:
            self._features.append(features)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._commit()

    def _commit(self) -> None:
        store, loc, header = self.store, self.store.loc, self.store.header
        columns = {k: np.concatenate([c[k] for c in self._columns]) for k in self._columns[0]}
        rows = len(columns["sample_id"])
        expected = min(header["shard_rows"], header["num_rows"] - self.first_row)
        if rows != expected:
            raise RuntimeError(f"shard {self.index} got {rows} rows, expected {expected}")
        key = parquet_key(self.index)
        table = encode_table(columns, store.codec)
        data = table_to_parquet_bytes(table, store.codec.parquet_options())
        faults.point("shard.encoded")
        loc.write_bytes(data, key)
        faults.point("shard.parquet")
        files = {key: digests(data)}
        keys = []
        payload = payload_bytes(table)
        if store.features:
            feats = np.concatenate(self._features).astype(store.features["dtype"], copy=False)
            store.array[self.first_row : self.first_row + rows] = feats
            faults.point("shard.features")
            payload += feats.nbytes
            keys += feature_chunk_keys(
                self.index, store.features["dim"], store.features["chunk_cols"]
            )
        for k in keys:
            files[k] = loc.digests(k)
        entry = {
            "index": self.index,
            "first_row": self.first_row,
            "rows": rows,
            "files": files,
            "stats": {**self.stats, "payload_bytes": payload},
        }
        if self.stats.get("tokens"):
            # Sums add up across shards; these per-shard means are for reading, not adding.
            sums = entry["stats"]
            entry["means"] = {
                "bytes_per_token": payload / sums["tokens"],
                **store.codec.summarise(sums),
            }
        marker = {"fingerprint": header["fingerprint"], "entry": entry}
        if store.conditions is not None:
            marker["conditions"] = store.conditions
        faults.point("shard.hashed")
        loc.write_bytes(dumps(marker), f"{COMMITS}/{shard_name(self.index)}.json")
        faults.point("shard.marker")
