"""Checking every store file a reader uses against the checksums its manifest recorded.

A store is read by many students for months, so a damaged byte must stop the reader, not train
them: each listed file is checked the first time a reader reads it, on the very bytes the reader
then decodes (never a second read). The writer records two checksums per file: `sha256`, the
strong one `kdcache verify` uses, and `xxh3_64` (the xxhash package), which is about 10x faster
than sha256 here and keeps the check within a few percent of the reader's throughput. Stores
written before `xxh3_64` existed (`kdcache/1`, early `kdcache/2`) are checked with `sha256`.
"""

from __future__ import annotations

import hashlib

import xxhash
from zarr.storage import WrapperStore

from kdcache.storage.errors import IntegrityError

FAST = "xxh3_64"
STRONG = "sha256"
CHECKSUMS = (STRONG, FAST)


def _fast():
    return xxhash.xxh3_64()


class Digester:
    """Both checksums of a file fed in pieces (`update`), as `digests` gives for the whole."""

    def __init__(self):
        self.strong, self.fast, self.size = hashlib.sha256(), _fast(), 0

    def update(self, chunk) -> None:
        self.strong.update(chunk)
        self.fast.update(chunk)
        self.size += len(chunk)

    def entry(self) -> dict:
        return {STRONG: self.strong.hexdigest(), FAST: self.fast.hexdigest(), "bytes": self.size}


def digests(data) -> dict:
    """The manifest entry of a file's bytes: both checksums and the size."""
    d = Digester()
    d.update(memoryview(data).cast("B"))
    return d.entry()


def listed_files(manifest: dict) -> dict[str, dict]:
    """Every file the manifest lists (store-level and per shard) -> its recorded entry."""
    out = dict(manifest.get("files", {}))
    for shard in manifest["shards"]:
        out.update(shard["files"])
    return out


class ReadChecker:
    """Checks each listed file once, on the first bytes read of it; `enabled=False` trusts all.

    `path(key)` names the file in messages; `url` is the store. Thread-safe enough for the
    prefetch thread and the main thread: at worst a file is checked twice.
    """

    def __init__(self, manifest: dict, url: str, path, enabled: bool = True):
        self.listed = listed_files(manifest)
        self.url, self.path, self.enabled = url, path, enabled
        self.checked: set[str] = set()

    def pending(self, key: str) -> bool:
        """True when `key` still needs checking: a reader must then read the whole file."""
        return self.enabled and key not in self.checked and key in self.listed

    def hasher(self, key: str):
        """The incremental hash `key` is checked with: xxh3_64 when recorded, else sha256."""
        return _fast() if FAST in self.listed[key] else hashlib.sha256()

    def check(self, key: str, data) -> None:
        """Check a whole file's bytes (once per reader)."""
        if self.pending(key):
            view = memoryview(data).cast("B")
            h = self.hasher(key)
            h.update(view)
            self.conclude(key, view.nbytes, h)

    def conclude(self, key: str, size: int, h) -> None:
        """IntegrityError unless `size` bytes hashed into `h` are what the manifest recorded."""
        want = self.listed[key]
        if size != want["bytes"] or h.hexdigest() != want[FAST if FAST in want else STRONG]:
            raise IntegrityError(
                f"{self.path(key)} does not match the checksum in the manifest of {self.url} "
                f"(damaged or changed since it was written): run `kdcache verify {self.url}` to "
                "list every damaged file, then recompute the store (precompute --force)"
            )
        self.checked.add(key)

    def missing(self, key: str) -> IntegrityError:
        return IntegrityError(
            f"{self.path(key)} is listed in the manifest of {self.url} but missing: run "
            f"`kdcache verify {self.url}`, then recompute the store (precompute --force)"
        )


class CheckedStore(WrapperStore):
    """A zarr store that checks every whole-file read of a listed key (`prefix/key`): the
    feature chunks and `zarr.json` of a non-default layout (zstd, several column blocks)."""

    def __init__(self, store, checker: ReadChecker | None = None, prefix: str = ""):
        super().__init__(store)
        self._checker, self._prefix = checker, prefix

    def _with_store(self, store):
        return type(self)(store, self._checker, self._prefix)

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        name = f"{self._prefix}/{key}"
        if self._checker is not None and byte_range is None:
            if buf is None and name in self._checker.listed:
                raise self._checker.missing(name)
            if buf is not None:
                self._checker.check(name, buf.as_numpy_array())
        return buf
