"""The manifest: one JSON document that names every shard, its checksums and the fingerprint.

It is written last, in one atomic publish, after every shard is durable; its presence is what makes
a store complete. `_run.json` (the same header, no shards) is written first so that a rerun can
tell "resume my own run" from "someone else's settings" before a manifest exists.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from importlib import metadata

from kdcache.storage.errors import FormatError
from kdcache.storage.fsio import Location

FORMAT = "kdcache/2"
# Every version this reader understands (docs/FORMAT.md lists what changed between them).
READABLE = ("kdcache/1", "kdcache/2")
MANIFEST = "manifest.json"
RUN_FILE = "_run.json"
COMMITS = "_commits"
SOFT_LABELS = "soft_labels"
FEATURES = "features.zarr"
LOCK_FILE = "_lock.json"


def kdcache_version() -> str:
    try:
        return metadata.version("kdcache")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def balanced_shard_rows(num_rows: int, requested: int) -> int:
    """Rows per shard: as many shards as `requested` rows each would need, made equal in size,
    so the last shard (and its feature chunk, which Zarr stores at full chunk shape) is never
    mostly padding."""
    shards = max(1, -(-num_rows // requested))
    return max(1, -(-num_rows // shards))


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def parquet_key(index: int) -> str:
    return f"{SOFT_LABELS}/{shard_name(index)}.parquet"


def dumps(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def read_json(loc: Location, name: str) -> dict | None:
    if not loc.exists(name):
        return None
    try:
        return json.loads(loc.read_bytes(name))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(
            f"{loc.path(name)} is not valid JSON ({exc}); the store is damaged: recompute it "
            "into the same --out with `kdcache precompute ... --force`"
        ) from None


def load_manifest(loc: Location) -> dict:
    """Read and validate the manifest; an absent one means the store is incomplete or missing."""
    doc = read_json(loc, MANIFEST)
    if doc is None:
        if loc.exists(RUN_FILE):
            raise FormatError(
                f"{loc.url} is an incomplete kdcache store (no {MANIFEST}): rerun the same "
                "`kdcache precompute` command to finish it"
            )
        raise FormatError(
            f"{loc.url} is not a kdcache store: {MANIFEST} not found; point it at the --out of "
            "a finished `kdcache precompute`"
        )
    check_format(doc, loc.url)
    return doc


def check_format(doc: dict, url: str) -> None:
    fmt = doc.get("format")
    if fmt not in READABLE:
        raise FormatError(
            f"{url}: unknown store format {fmt!r}; this kdcache {kdcache_version()} reads "
            f"{' and '.join(map(repr, READABLE))}. "
            "Upgrade kdcache or recompute the store with --force"
        )
    for key in ("fingerprint", "shards", "num_rows", "soft_labels", "temperature", "teacher"):
        if key not in doc:
            raise FormatError(f"{url}: manifest lacks {key!r}; the store is damaged, recompute it")


def diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two JSON-like dicts, with both values."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff(a, b, path + "."))
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# The header fields that decide the bytes of a store. Execution settings (device, batch size,
# workers) are left out on purpose: they change speed, not what is computed, so a cache made on a
# GPU serves a CPU rerun. Precision stays in: bf16 logits are different numbers.
FINGERPRINT_FIELDS = (
    "teacher",
    "data",
    "temperature",
    "soft_labels",
    "features",
    "shard_rows",
    "task",
    "precision",
    "views",
    # Regression stores written since targets were kept; absent from every other store, whose
    # fingerprints must not change (so it is hashed only when present).
    "targets",
)


def store_fingerprint(header: dict) -> str:
    teacher = {k: v for k, v in header["teacher"].items() if k != "checkpoint"}
    # `views` and `targets` only when present: a store without them keeps the fingerprint it had
    # before they existed (a cache hit, not a recompute).
    optional = ("views", "targets")
    doc = {k: header.get(k) for k in FINGERPRINT_FIELDS if k not in optional or header.get(k)}
    doc["teacher"] = teacher
    doc["data"] = {k: v for k, v in header["data"].items()}
    return hash_json(doc)
