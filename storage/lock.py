"""One writer per store: a lock file naming its owner, with a staleness rule.

The lock is `URL/_lock.json` holding owner host, pid, a random token and a heartbeat time. A lock
is stale, and may be taken over, when its owner is on this host and its pid is gone, or when its
heartbeat is older than `stale_after` seconds (default 600; the owner refreshes it at least every
60 s while it works).

Taking a free lock is an exclusive create (a hard link locally, a conditional PUT with
If-None-Match on S3), so of two runs starting at once exactly one wins. Taking over a stale lock
deletes it first and then creates; every take is read back, and a run that does not find its own
token backs off. The heartbeat and the final publish re-read the lock: a run whose lock was taken
over as stale stops before it writes the manifest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from kdcache.storage import faults
from kdcache.storage.errors import LockedError
from kdcache.storage.fsio import Location
from kdcache.storage.manifest import LOCK_FILE, dumps

HEARTBEAT_SECONDS = 60.0
# How long a non-atomic create's racers are given to land their PUTs before the second read-back.
SETTLE_SECONDS = 0.5
log = logging.getLogger("kdcache.lock")


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

    def _torn(self) -> bool:
        return self._current() is None and self.loc.exists(LOCK_FILE)

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
                f"{self.loc.url.rstrip('/')}/{LOCK_FILE} if you are sure it is dead "
                f"(it goes stale by itself after {self.stale_after:.0f}s)"
            )
        if held is not None and held.get("token") != self.token or self._torn():
            self.loc.remove(LOCK_FILE)  # stale or unreadable: take it over
        try:
            self.loc.create_bytes(dumps(self._doc()), LOCK_FILE)
        except FileExistsError:
            raise self._raced() from None
        try:
            # The read-back decides where the create is not atomic (moto's If-None-Match, some
            # S3-compatible stores): both PUTs succeed, the later one wins, the other backs off.
            held = self._current()
            if held is None or held.get("token") != self.token:
                raise self._raced()
            if not self.loc.atomic_create:
                # A read-back can come before the other racer's PUT lands (both then saw their
                # own token: seen on moto under load): read once more after the racers' PUTs
                # have settled, so that only the last writer keeps the lock. Once per run.
                time.sleep(SETTLE_SECONDS)
                held = self._current()
                if held is None or held.get("token") != self.token:
                    raise self._raced()
            faults.point("lock.acquired")
            self._thread = threading.Thread(target=self._beat, daemon=True, name="kdcache-lock")
            self._thread.start()
        except BaseException:
            # Stopped (SIGTERM, Ctrl-C) between taking the lock and handing it to the caller,
            # whose cleanup only covers a lock it got: free it here, or it blocks every rerun.
            self.release()
            raise

    def _raced(self) -> LockedError:
        return LockedError(
            f"{self.loc.url}: another run took the lock at the same moment; retry later"
        )

    def check(self) -> None:
        """LockedError unless the lock file still holds this run's token."""
        mine = self._current()
        if mine is None or mine.get("token") != self.token:
            owner = "nobody" if mine is None else f"pid {mine.get('pid')} on {mine.get('host')}"
            raise LockedError(
                f"{self.loc.url}: this run lost its lock (now held by {owner}); rerun the same "
                "command once the other run is done"
            )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            # A missed heartbeat only risks the lock looking stale later; never kill the run.
            with contextlib.suppress(Exception):
                self.check()
                self.loc.write_bytes(dumps(self._doc()), LOCK_FILE)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self._current()
            if held is not None and held.get("token") == self.token:
                self.loc.remove(LOCK_FILE)
        except Exception as exc:  # noqa: BLE001 - never hide the error that ended the run
            # The storage itself failed (endpoint gone, disk full): the lock stays and goes
            # stale by the usual rule; a rerun on this host takes it over at once.
            log.info("could not release the lock %s: %s", self.loc.path(LOCK_FILE), exc)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
