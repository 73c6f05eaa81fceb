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


def test_heartbeat_older_than_600_s_is_stale_on_any_host(loc):
    """docs/FORMAT.md's rule, pinned on both sides: 599 s old is live, 601 s old is stale."""
    write_lock(loc, host="elsewhere", pid=12345, heartbeat=time.time() - 599)
    with pytest.raises(LockedError, match="pid 12345 on elsewhere .*stale by itself after 600s"):
        StoreLock(loc).acquire()
    write_lock(loc, host="elsewhere", pid=12345, heartbeat=time.time() - 601)
    with StoreLock(loc) as lock:
        assert read_lock(loc)["token"] == lock.token


def test_a_live_pid_on_this_host_is_stale_only_by_its_heartbeat(loc, live_pid):
    write_lock(loc, pid=live_pid, heartbeat=time.time() - 599)
    with pytest.raises(LockedError, match=f"pid {live_pid}"):
        StoreLock(loc).acquire()
    write_lock(loc, pid=live_pid, heartbeat=time.time() - 601)
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


def test_racing_acquire_backs_off_with_locked_error(tmp_path):
    race_two_processes(str(tmp_path / "store"))


RACER = """
import sys, time
from kdcache.storage.errors import LockedError
from kdcache.storage.fsio import open_location
from kdcache.storage.lock import StoreLock
url, blind = sys.argv[1], sys.argv[2] == "1"
lock = StoreLock(open_location(url))
if blind:  # this run looked before the other created its lock: only the create can decide
    look, seen = lock._current, []
    lock._current = lambda: look() if seen.append(1) or len(seen) > 1 else None
print("ready", flush=True)
sys.stdin.readline()  # both processes are released at once
try:
    lock.acquire()
except LockedError as exc:
    print("lost", str(exc).replace("\\n", " "), flush=True)
    code = 75
else:
    print("won", lock.token, flush=True)
    lock._stop.set()  # leave the lock behind for the test to read
    code = 0
# Alive until the test has both answers: a winner that exited at once would leave a lock of a
# dead pid, which a loser slowed down by a loaded machine may rightly take over as stale.
sys.stdin.readline()
sys.exit(code)
"""


def race_two_processes(url: str, rounds: int = 2, blind_rounds: int = 2) -> None:
    """Two real processes acquire the same free lock at the same moment, `rounds` times, then
    `blind_rounds` times more after both looked and saw no lock: each time exactly one wins, the other exits
    with LockedError, and the lock file holds the winner's token. Shared with the S3 test."""
    loc = open_location(url)
    for blind in [False] * rounds + [True] * blind_rounds:
        loc.remove(LOCK_FILE)
        cmd = [sys.executable, "-c", RACER, url, str(int(blind))]
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs = [subprocess.Popen(cmd, **pipes) for _ in range(2)]
        assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2
        for p in procs:
            p.stdin.write("go\n")
        for p in procs:
            p.stdin.flush()
        outs = [p.stdout.readline().split(" ", 1) for p in procs]
        for p in procs:
            p.communicate("done\n", timeout=60)
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, 75], outs
        (winner,) = [o[1].strip() for o in outs if o[0] == "won"]
        (loser,) = [o[1] for o in outs if o[0] == "lost"]
        assert read_lock(loc)["token"] == winner
        if blind:
            assert "another run took the lock at the same moment" in loser


def test_check_fails_once_the_lock_is_taken_over(loc):
    with StoreLock(loc) as lock:
        lock.check()
        write_lock(loc, token="thief", pid=os.getpid())
        with pytest.raises(LockedError, match="lost its lock"):
            lock.check()
