"""One writer per store: a lock file naming its owner, with a staleness rule.

The lock is `URL/_lock.json` holding owner host, pid, a random token and a heartbeat time. A lock
is stale, and may be taken over, when its owner is on this host and its pid is gone, or when its
heartbeat is older than `stale_after` seconds (default 600; the owner refreshes it at least every
60 s while it works). Object stores have no exclusive create, so taking a lock is
write-then-read-back: the last writer wins and the loser sees a foreign token and backs off.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from storage.errors import LockedError
from storage.fsio import Location
from storage.manifest import LOCK_FILE, dumps

HEARTBEAT_SECONDS = 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Context manager holding the store's lock, refreshed by a daemon thread."""

    def __init__(self, loc: Location, stale_after: float = 600.0):
        self.loc = loc
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "heartbeat": time.time(),
        }

    def _current(self) -> dict | None:
        if not self.loc.exists(LOCK_FILE):
            return None
        try:
            return json.loads(self.loc.read_bytes(LOCK_FILE))
        except (json.JSONDecodeError, FileNotFoundError):
            return None  # a torn or vanished lock file protects nothing

    def is_stale(self, doc: dict) -> bool:
        if doc.get("host") == socket.gethostname() and not _pid_alive(int(doc.get("pid", -1))):
            return True
        return time.time() - float(doc.get("heartbeat", 0)) > self.stale_after

    def acquire(self) -> None:
        held = self._current()
        if held is not None and held.get("token") != self.token and not self.is_stale(held):
            age = time.time() - float(held.get("heartbeat", 0))
            raise LockedError(
                f"{self.loc.url} is locked by pid {held.get('pid')} on {held.get('host')} "
                f"(heartbeat {age:.0f}s ago): wait for that run to finish, or delete "
                f"{self.loc.path(LOCK_FILE)} if you are sure it is dead "
                f"(it goes stale by itself after {self.stale_after:.0f}s)"
            )
        self.loc.write_bytes(dumps(self._doc()), LOCK_FILE)
        mine = self._current()
        if mine is None or mine.get("token") != self.token:
            raise LockedError(f"{self.loc.url}: another run took the lock at the same moment")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="kdcache-lock")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            # A missed heartbeat only risks the lock looking stale later; never kill the run.
            with contextlib.suppress(Exception):
                self.loc.write_bytes(dumps(self._doc()), LOCK_FILE)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._current()
        if held is not None and held.get("token") == self.token:
            self.loc.remove(LOCK_FILE)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
