"""fsspec I/O with one rule: what a reader can see is always a whole file.

Local folders publish by writing a temporary sibling and renaming it. Object stores cannot rename,
but a single PUT is atomic there (an object is visible whole or not at all), so they get one
`pipe` of the finished bytes. Either way nobody reads a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from dataclasses import dataclass, field

import fsspec

from kdcache.storage import faults
from kdcache.storage.errors import KdcacheError, UsageError
from kdcache.storage.integrity import Digester

_CHUNK = 8 << 20


def _strip_file_scheme(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


@dataclass
class Location:
    """A store root: the fsspec filesystem, the root path inside it and the URL the user gave."""

    url: str
    _fs: fsspec.AbstractFileSystem = field(repr=False)
    root: str
    storage_options: dict = field(default_factory=dict)
    _pid: int = field(default_factory=os.getpid, repr=False, compare=False)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        # Async filesystems (s3fs, gcsfs, ...) run an event loop thread and refuse to work in a
        # forked child such as a DataLoader worker: each process resolves the URL for itself.
        if self._pid != os.getpid():
            self._fs, self._pid = _filesystem(self.url, self.storage_options)[0], os.getpid()
        return self._fs

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    @property
    def atomic_create(self) -> bool:
        """Whether `create_bytes` is atomic against other processes: a local hard link, or an
        in-process memory filesystem. An object store's conditional PUT is atomic on AWS S3
        but not on every S3-compatible server (moto's is not)."""
        return self.is_local or "memory" in _protocols(self.fs)

    @property
    def zarr_store(self) -> str:
        # zarr wants a plain path for local folders (its LocalStore) and a URL otherwise.
        return self.root if self.is_local else self.url.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _fresh(self, path: str) -> str:
        # Other processes (ranks, other runs) write here too: never answer from a directory
        # listing this process cached earlier (s3fs and other object stores cache them).
        self.fs.invalidate_cache(path)
        return path

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self._fresh(self.path(*parts)))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Publish `data` under `parts` so that readers see all of it or nothing."""
        target = self.path(*parts)
        if self.is_local:
            tmp = self._durable_temporary(data, target)
            faults.point("write." + "/".join(parts))  # the bytes are down, not yet published
            os.replace(tmp, target)
        else:
            faults.point("write." + "/".join(parts))
            self.fs.pipe_file(target, data)

    def create_bytes(self, data: bytes, *parts: str) -> None:
        """Like `write_bytes`, but FileExistsError when `parts` exists: an exclusive create.

        Locally a hard link of a finished temporary file (atomic, and refused when the target
        exists); elsewhere fsspec's create mode, a conditional PUT (If-None-Match) on s3fs.
        """
        target = self.path(*parts)
        if not self.is_local:
            self.fs.pipe_file(target, data, mode="create")  # s3fs maps a 412 to FileExistsError
            return
        tmp = self._durable_temporary(data, target)
        try:
            os.link(tmp, target)
        finally:
            os.remove(tmp)

    def _durable_temporary(self, data: bytes, target: str) -> str:
        """`data` fsynced into a unique sibling of `target` (local folders only); its path."""
        parent = target.rsplit("/", 1)[0]
        try:
            self.fs.makedirs(parent, exist_ok=True)
        except FileExistsError:
            # A file where a folder should be: not "exists", which callers read as a lost race.
            raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", parent) from None
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            # A failed write() names no file: name the one being written (disk full, ...).
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise OSError(exc.errno, exc.strerror, target) from None
        return tmp

    def sweep_temporaries(self, keep: str | None = None) -> None:
        """Delete the temporary files a killed writer left in a local folder (ours: `*.tmp-<hex>`,
        zarr's: `*.<hex>.partial`), except those of names starting with `keep`. Object stores
        have none: they get whole PUTs."""
        if not self.is_local or not self.fs.exists(self.root):
            return
        for path in self.fs.find(self.root):
            name = path.rsplit("/", 1)[-1]
            if keep and name.startswith(keep):
                continue
            if ".tmp-" in name or name.endswith(".partial"):
                self.fs.rm_file(path)

    def remove(self, *parts: str, recursive: bool = False) -> None:
        target = self.path(*parts)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=recursive)

    def digests(self, *parts: str) -> dict:
        """A file's manifest entry (both checksums and its size), streamed in chunks."""
        d = Digester()
        with self.fs.open(self.path(*parts), "rb") as f:
            while chunk := f.read(_CHUNK):
                d.update(chunk)
        return d.entry()

    def modified(self, *parts: str) -> float:
        """Last modification time of a file, in seconds since the epoch."""
        return self.fs.modified(self._fresh(self.path(*parts))).timestamp()

    def is_dir(self, *parts: str) -> bool:
        return self.fs.isdir(self._fresh(self.path(*parts)))

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) directly below `parts`; empty when it does not exist."""
        target = self._fresh(self.path(*parts))
        if not self.fs.exists(target):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(target, detail=False))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def open_location(url: str, storage_options: dict | None = None) -> Location:
    """Resolve a user URL (plain path, file://, memory://, s3://, ...) to a Location."""
    if not url:
        raise UsageError("empty store URL: pass a folder or fsspec URL, e.g. --out runs/cache")
    options = dict(storage_options or {})
    plain = _strip_file_scheme(url)
    try:
        fs, root = _filesystem(plain, options)
    except (ImportError, ValueError) as exc:
        hint = " (install the extra: pip install 'kdcache[s3]')" if url.startswith("s3") else ""
        raise UsageError(f"cannot open store URL {url!r}: {exc}{hint}") from None
    url = root if "://" not in plain else url
    return Location(url=url, _fs=fs, root=root.rstrip("/"), storage_options=options)


def _filesystem(url: str, options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    if "://" not in url:
        return fsspec.filesystem("file"), os.path.abspath(url)
    return fsspec.core.url_to_fs(url, **options)


def parse_storage_options(pairs: tuple[str, ...] | list[str]) -> dict:
    """`key=value` pairs from the CLI; values that look like JSON scalars are parsed as such."""
    import json

    options: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option {pair!r} is not key=value, e.g. anon=true")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


# Network failures of the object-store clients fsspec uses (botocore, aiohttp, requests), by class
# name: none of those packages is a dependency of this module.
_NETWORK = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ConnectionClosedError",
}


def io_failure(exc: BaseException, where: str | None = None) -> KdcacheError | None:
    """The one-line error for a storage failure (disk full, read-only, endpoint gone), naming
    the location and what to do; None when `exc` is not one."""
    names = {c.__name__ for c in type(exc).__mro__}
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if names & _NETWORK or isinstance(exc, ConnectionError | TimeoutError):
        return KdcacheError(
            f"lost the connection to the storage{f' of {where}' if where else ''} "
            f"({type(exc).__name__}: {text}): once the endpoint is reachable again, rerun the "
            "same command; it resumes where it stopped"
        )
    if not isinstance(exc, OSError):
        return None
    # A temporary's name means nothing to the user: name the file it was to become.
    path = re.sub(r"\.tmp-[0-9a-f]{32}$", "", str(exc.filename or where or "the output"))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return KdcacheError(
            f"no space left on the device of {path}: free space there (or use another --out), "
            "then rerun the same command; it keeps what is already committed and resumes"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UsageError(
            f"cannot write to {path}: {exc.strerror}; choose a writable location, or fix its "
            "permissions and rerun the same command"
        )
    return None
