"""kdcache.storage.faults: the hooks the fault campaign (tests/faults) kills processes at."""

from __future__ import annotations

import os
import signal

import pytest

from kdcache.storage import faults


def test_parse():
    assert faults.parse("shard.marker") == ("shard.marker", 1, signal.SIGKILL)
    assert faults.parse("shard.marker:3") == ("shard.marker", 3, signal.SIGKILL)
    assert faults.parse("write.soft_labels/part-00000.parquet:2:term") == (
        "write.soft_labels/part-00000.parquet",
        2,
        signal.SIGTERM,
    )


def test_a_point_does_nothing_unless_named(monkeypatch):
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig))
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.point("shard.marker")
    monkeypatch.setenv(faults.ENV, "shard.marker.x:1")  # a longer name is another point
    faults.point("shard.marker")
    assert sent == []


def test_the_nth_hit_sends_the_signal(monkeypatch):
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setattr(faults.time, "sleep", lambda s: None)
    monkeypatch.setenv(faults.ENV, "test.point:3:USR1")
    for _ in range(5):
        faults.point("test.point")
        faults.point("other.point")
    assert sent == [(os.getpid(), signal.SIGUSR1)]  # once: the third hit only


def test_an_unknown_signal_is_refused(monkeypatch):
    monkeypatch.setenv(faults.ENV, "p:1:NOPE")
    with pytest.raises(KeyError):
        faults.point("p")
