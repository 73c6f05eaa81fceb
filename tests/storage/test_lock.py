"""StoreLock: one writer per store, with takeover of stale locks (dead pid here, or old heartbeat)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import kdcache.storage.lock as lock_mod
from kdcache.storage.errors import LockedError
from kdcache.storage.fsio import open_location
from kdcache.storage.lock import StoreLock
from kdcache.storage.manifest import LOCK_FILE, dumps


@pytest.fixture(params=["local", "memory"])
def loc(request, tmp_path):
    if request.param == "local":
        return open_location(str(tmp_path / "store"))
    return open_location(request.getfixturevalue("memory_url"))


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(loc, **fields) -> None:
    doc = {"host": socket.gethostname(), "pid": 1, "token": "other", "heartbeat": time.time()}
    doc.update(fields)
    loc.write_bytes(dumps(doc), LOCK_FILE)


def read_lock(loc) -> dict:
    return json.loads(loc.read_bytes(LOCK_FILE))


def test_acquire_writes_owner_and_release_removes(loc):
    with StoreLock(loc) as lock:
        doc = read_lock(loc)
        assert doc["pid"] == os.getpid() and doc["host"] == socket.gethostname()
        assert doc["token"] == lock.token and abs(doc["heartbeat"] - time.time()) < 60
    assert not loc.exists(LOCK_FILE)


def test_live_lock_of_another_process_is_refused_naming_its_pid(loc, live_pid):
    write_lock(loc, pid=live_pid)
    with pytest.raises(LockedError) as info:
        StoreLock(loc).acquire()
    assert info.value.exit_code == 75
    assert f"locked by pid {live_pid} on {socket.gethostname()}" in str(info.value)
    assert read_lock(loc)["token"] == "other"  # untouched


def test_lock_of_dead_pid_on_this_host_is_taken_over(loc, dead_pid):
    write_lock(loc, pid=dead_pid)
    with StoreLock(loc) as lock:
        assert read_lock(loc)["token"] == lock.token


def test_old_heartbeat_is_stale_on_any_host(loc):
    write_lock(loc, host="elsewhere", pid=12345, heartbeat=time.time() - 601)
    with StoreLock(loc) as lock:
        assert read_lock(loc)["token"] == lock.token


def test_fresh_lock_on_another_host_is_respected(loc):
    # Its pid cannot be checked from here, so only the heartbeat can make it stale.
    write_lock(loc, host="elsewhere", pid=12345, heartbeat=time.time() - 30)
    with pytest.raises(LockedError, match="pid 12345 on elsewhere"):
        StoreLock(loc).acquire()
    with StoreLock(loc, stale_after=10) as lock:
        assert read_lock(loc)["token"] == lock.token


def test_torn_lock_file_is_taken_over(loc):
    loc.write_bytes(b'{"host": "x", "pi', LOCK_FILE)
    with StoreLock(loc) as lock:
        assert read_lock(loc)["token"] == lock.token


def test_release_leaves_a_lock_it_lost(loc):
    lock = StoreLock(loc)
    lock.acquire()
    write_lock(loc, token="thief", pid=os.getpid())
    lock.release()
    assert read_lock(loc)["token"] == "thief"


def test_heartbeat_is_refreshed(loc, monkeypatch):
    monkeypatch.setattr(lock_mod, "HEARTBEAT_SECONDS", 0.05)
    with StoreLock(loc):
        first = read_lock(loc)["heartbeat"]
        deadline = time.time() + 10
        while read_lock(loc)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert read_lock(loc)["heartbeat"] > first


def test_free_lock_is_an_exclusive_create(loc):
    # Two runs that both saw no lock: the second create must fail, not overwrite the first.
    loc.create_bytes(b"first", LOCK_FILE)
    with pytest.raises(FileExistsError):
        loc.create_bytes(b"second", LOCK_FILE)
    assert loc.read_bytes(LOCK_FILE) == b"first"


def test_racing_acquire_backs_off_with_locked_error(loc, monkeypatch):
    lock = StoreLock(loc)
    # The other run creates its lock between our look and our create.
    real_create = loc.create_bytes

    def create_after_thief(data, *parts):
        write_lock(loc, token="thief", pid=os.getpid())
        real_create(data, *parts)

    monkeypatch.setattr(loc, "create_bytes", create_after_thief)
    with pytest.raises(LockedError, match="at the same moment"):
        lock.acquire()
    assert read_lock(loc)["token"] == "thief"


def test_check_fails_once_the_lock_is_taken_over(loc):
    with StoreLock(loc) as lock:
        lock.check()
        write_lock(loc, token="thief", pid=os.getpid())
        with pytest.raises(LockedError, match="lost its lock"):
            lock.check()
