"""The S3 endpoint goes away mid-write and mid-read, then comes back: one clear error line, and
the same command again completes with nothing lost or duplicated.

The kdcache process talks to moto through a relay (tests/faults/proxy.py); it stops itself at a
named point (KDCACHE_FAULT=...:STOP), the relay is stopped, the process continued, so the outage
hits a known step. Two "hosts" (two processes that call themselves host-a and host-b, which is
what the lock records) then share one S3 store.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.conftest import cli_args, wait_for
from tests.faults.conftest import exit_text, last_line, start_with_fault, stopped
from tests.faults.proxy import Relay
from tests.faults.test_kill_train import assert_same, outcome, train_args
from tests.integration.conftest import s3_objects

pytestmark = pytest.mark.s3
N = 96
# botocore's own retries on top of s3fs's five make an outage cost ~30 s per request to notice;
# one attempt each keeps the campaign short (s3fs still retries; the outcome is the same).
FEWER_RETRIES = {"AWS_MAX_ATTEMPTS": "1"}


@pytest.fixture
def relay(s3_endpoint):
    r = Relay(s3_endpoint)
    r.start()
    yield r
    r.stop()


def store_keys(fs, url: str) -> dict[str, bytes]:
    """Every object of a store but the manifest (compared apart): data, markers, run header."""
    return s3_objects(fs, url, ("soft_labels/", "features.zarr/", "_commits/", "_run.json"))


def manifest(fs, url: str) -> dict:
    doc = json.loads(fs.cat_file(url.removeprefix("s3://") + "/manifest.json"))
    for key in ("created",):
        doc.pop(key)
    for key in ("teacher_seconds", "wall_seconds"):
        doc["stats"].pop(key)
    return doc


def pause_then_cut(proc, relay, what: str) -> None:
    wait_for(lambda: stopped(proc), proc, 120, what)
    relay.stop()
    os.kill(proc.pid, signal.SIGCONT)


def test_endpoint_lost_mid_write(s3_url, relay, cli, s3fs_fresh, placeholders, fault_row):
    placeholders.add(s3_url, "s3://kdcache-test/<prefix>")
    placeholders.add(s3_url.removeprefix("s3://"), "kdcache-test/<prefix>")
    args = cli_args(s3_url, "--features", "body", n=N)
    env = {"AWS_ENDPOINT_URL": relay.endpoint, **FEWER_RETRIES}
    proc = start_with_fault(args, "shard.parquet:2:STOP", **env)
    pause_then_cut(proc, relay, "the stop after shard 1's Parquet")
    out, err = proc.communicate(timeout=300)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    seen = " / ".join(lines)
    code = proc.returncode

    relay.start()
    root = s3_url.removeprefix("s3://")
    s3fs_fresh.invalidate_cache()
    assert not s3fs_fresh.exists(root + "/manifest.json")  # nothing half-written looks complete
    committed = len(s3fs_fresh.find(root + "/_commits"))
    rerun = start_with_fault(args, None, **env)
    rout, rerr = rerun.communicate(timeout=300)
    ref = s3_url + "-reference"
    assert cli(*cli_args(ref, "--features", "body", n=N)).exit_code == 0
    fault_row(
        kind="S3 outage",
        case="endpoint lost mid-write (precompute)",
        fault="relay to moto closed after shard 1's Parquet PUT, before its features",
        seen=seen,
        exit=exit_text(code),
        recovery=f"endpoint back, rerun the same command ({committed} shard kept): "
        + last_line(rout).split(" in ")[0],
    )
    assert code == 1
    assert_one_line(err, "lost the connection to the storage", "features.zarr", "rerun the same")
    assert relay.endpoint.split("//")[1] in lines[0]
    assert committed == 1
    assert rerun.returncode == 0, rerr
    s3fs_fresh.invalidate_cache()
    assert store_keys(s3fs_fresh, s3_url) == store_keys(s3fs_fresh, ref)  # same keys, same bytes
    assert manifest(s3fs_fresh, s3_url) == manifest(s3fs_fresh, ref)
    assert not s3fs_fresh.exists(root + "/_lock.json")


def test_endpoint_lost_mid_read(s3_url, relay, cli, tmp_path, placeholders, fault_row):
    """Train from an S3 cache; the endpoint goes after epoch 1, while epoch 2 streams shards."""
    placeholders.add(s3_url, "s3://kdcache-test/<prefix>")
    placeholders.add(s3_url.removeprefix("s3://"), "kdcache-test/<prefix>")
    n = 48
    assert cli(*cli_args(s3_url, "--features", "body", n=n)).exit_code == 0
    ref = tmp_path / "reference" / "student"  # the same name: a run is named by its folder
    assert cli(*train_args(s3_url, ref)).exit_code == 0
    out = tmp_path / "student"
    args = train_args(s3_url, out)
    env = {"AWS_ENDPOINT_URL": relay.endpoint, **FEWER_RETRIES}
    proc = start_with_fault(args, "train.epoch:1:STOP", **env)
    pause_then_cut(proc, relay, "the stop after epoch 1")
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    code = proc.returncode
    left = sorted(p.name for p in out.iterdir())
    relay.start()
    rerun = start_with_fault(args, None, **env)
    rout, rerr = rerun.communicate(timeout=300)
    fault_row(
        kind="S3 outage",
        case="endpoint lost mid-read (train)",
        fault="relay to moto closed after epoch 1, before epoch 2 reads its shards",
        seen=" / ".join(lines),
        exit=exit_text(code),
        recovery="endpoint back, rerun the same command (resumes from checkpoint-1): "
        + last_line(rout).split(" (best")[0],
    )
    assert code == 1
    assert_one_line(err, "lost the connection to the storage", ".parquet", "rerun the same")
    assert relay.endpoint.split("//")[1] in lines[0]
    assert left == ["checkpoint-1.pt", "metrics.csv"]  # no summary.json: not finished
    assert rerun.returncode == 0, rerr
    assert_same(outcome(out), outcome(ref))


def test_two_hosts_on_one_s3_store(s3_url, cli, s3fs_fresh, placeholders, fault_row):
    placeholders.add(s3_url, "s3://kdcache-test/<prefix>")
    placeholders.add(s3_url.removeprefix("s3://"), "kdcache-test/<prefix>")
    two_hosts(s3_url, cli, fault_row, "S3", lambda: s3fs_fresh.invalidate_cache())


def two_hosts(url: str, cli, fault_row, where: str, refresh) -> None:
    """host-a holds the lock (stopped mid-run), host-b runs the same command: refused with 75,
    naming host-a; host-a finishes; host-b's rerun is a cache hit. Then host-a dies holding the
    lock of a second store: host-b cannot tell a remote pid is dead and refuses until the
    heartbeat goes stale, or until the lock file is deleted as the message says."""
    args = cli_args(url, "--features", "body", n=N)
    a = start_with_fault(args, "shard.marker:1:STOP", host="host-a")
    wait_for(lambda: stopped(a), a, 120, "host-a's stop")
    b = start_with_fault(args, None, host="host-b")
    _, b_err = b.communicate(timeout=120)
    os.kill(a.pid, signal.SIGCONT)
    _, a_err = a.communicate(timeout=120)
    again = start_with_fault(args, None, host="host-b")
    again_out, _ = again.communicate(timeout=120)
    fault_row(
        kind="two writers",
        case=f"two hosts, one {where} store, the owner alive",
        fault="host-b runs the same precompute while host-a holds the lock",
        seen=last_line(b_err),
        exit=exit_text(b.returncode),
        recovery="host-a finishes (exit "
        + str(a.returncode)
        + "); host-b reruns: "
        + last_line(again_out).split(" (fingerprint")[0],
    )
    assert b.returncode == 75
    assert_one_line(b_err, "locked by pid", "on host-a", "wait for that run to finish")
    assert a.returncode == 0, a_err
    assert again.returncode == 0 and "cache hit" in again_out

    second = url + "-2"
    args = cli_args(second, "--features", "body", n=N)
    a = start_with_fault(args, "shard.marker:2", host="host-a")
    a.communicate(timeout=120)
    assert a.returncode == -9
    b = start_with_fault(args, None, host="host-b")
    _, b_err = b.communicate(timeout=120)
    assert b.returncode == 75
    assert_one_line(b_err, "on host-a", "delete", "_lock.json", "stale by itself after 600s")
    lock = last_line(b_err).split("delete ")[1].split(" if you")[0]
    assert lock == f"{second}/_lock.json"
    import fsspec

    fs, path = fsspec.core.url_to_fs(lock)
    fs.rm_file(path)
    refresh()
    again = start_with_fault(args, None, host="host-b")
    again_out, again_err = again.communicate(timeout=120)
    assert again.returncode == 0, again_err
    assert f"wrote {N} rows" in again_out
    fault_row(
        kind="two writers",
        case=f"two hosts, one {where} store, the owner killed",
        fault="host-a killed -9 holding the lock; host-b runs the same precompute",
        seen=last_line(b_err),
        exit=exit_text(b.returncode),
        recovery="delete the lock as the message says, rerun on host-b: "
        + last_line(again_out).split(" in ")[0],
    )


def assert_one_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], (needle, stderr)
