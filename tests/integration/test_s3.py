"""Both stages and the scheduled-job surface on a real S3 endpoint (moto's server, loopback)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from kdcache.storage.errors import FormatError
from kdcache.storage.reader import CacheReader
from tests.conftest import DATA, REPO, TEACHER, cli_args, kdcache_cmd, teacher_outputs, wait_for
from tests.integration.conftest import s3_objects, subprocess_env, toy_train_args
from tests.toy_models import FORBID_ENV, ToyNet

pytestmark = pytest.mark.s3


def test_precompute_inspect_verify_and_cache_hit(s3_url, cli, s3fs_fresh):
    res = cli(*cli_args(s3_url, "--features", "body"))
    assert res.exit_code == 0, res.stderr
    root = s3_url.removeprefix("s3://")
    keys = {k[len(root) + 1 :] for k in s3fs_fresh.find(root)}
    assert "manifest.json" in keys and "_lock.json" not in keys
    assert {f"soft_labels/part-0000{i}.parquet" for i in range(4)} <= keys
    assert not [k for k in keys if ".tmp-" in k]  # object stores get one PUT, no temp keys

    summary = json.loads(cli("inspect", s3_url, "--json").stdout)
    assert (summary["rows"], summary["shards"], summary["feature_dim"]) == (50, 4, 16)
    ok = cli("verify", s3_url)
    assert ok.exit_code == 0 and "ok:" in ok.stdout, ok.stderr

    # The same command again is a cache hit: exit 0 and not one teacher forward.
    hit = cli(*cli_args(s3_url, "--features", "body"), env={FORBID_ENV: "1"})
    assert hit.exit_code == 0, hit.stderr
    assert "cache hit" in hit.stdout

    # Rewrite one object with one byte flipped: verify fails, naming that key.
    key = f"{root}/soft_labels/part-00001.parquet"
    data = bytearray(s3fs_fresh.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    s3fs_fresh.pipe_file(key, bytes(data))
    bad = cli("verify", s3_url)
    assert bad.exit_code == 65
    assert "soft_labels/part-00001.parquet: checksum mismatch" in bad.stderr
    assert "part-00000" not in bad.stderr
    # A reader checks it too, before using its rows.
    deep = cli("inspect", s3_url, "--deep")
    assert deep.exit_code == 65
    assert "soft_labels/part-00001.parquet does not match the checksum" in deep.stderr


def test_store_without_manifest_is_refused(s3_url, cli, s3fs_fresh):
    assert cli(*cli_args(s3_url)).exit_code == 0
    s3fs_fresh.rm_file(s3_url.removeprefix("s3://") + "/manifest.json")
    with pytest.raises(FormatError, match=s3_url):
        CacheReader(s3_url)
    res = cli("verify", s3_url)
    assert res.exit_code == 1 and s3_url in res.stderr


def test_resume_after_kill_9_is_byte_identical(s3_url, cli, s3fs_fresh, tmp_path):
    """SIGKILL a subprocess writing to S3; the same command resumes and yields the same objects
    as an uninterrupted run, recomputing only shards that had no commit marker."""
    count = tmp_path / "forwards.txt"
    n, shards = 96, 6  # 16 rows per shard, 2 batches of 8 each
    teacher = ["--features", "body", "--teacher-arg", "sleep=0.1", "--teacher-arg"]
    args = cli_args(s3_url, *teacher, f"count_file={count}", n=n)
    commits = s3_url.removeprefix("s3://") + "/_commits"

    def committed() -> int:
        s3fs_fresh.invalidate_cache()
        return len(s3fs_fresh.find(commits))

    proc = subprocess.Popen(
        kdcache_cmd(*args), cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL
    )
    wait_for(lambda: committed() >= 2, proc, 90, "two commits")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    done = committed()
    assert 2 <= done < shards, done
    with pytest.raises(FormatError):
        CacheReader(s3_url)  # no manifest yet: readers refuse the partial store
    before = count.read_text().count("\n")

    res = cli(*args)  # the dead owner's lock is stale (same host, pid gone) and is taken over
    assert res.exit_code == 0, res.stderr
    assert count.read_text().count("\n") - before == 1 + 2 * (shards - done)  # probe + missing

    reference = s3_url + "-reference"
    assert cli(*cli_args(reference, "--features", "body", n=n)).exit_code == 0
    got, want = s3_objects(s3fs_fresh, s3_url), s3_objects(s3fs_fresh, reference)
    assert len(want) == 2 * shards + 1  # Parquet + feature chunk per shard, zarr.json
    assert got == want
    assert cli("verify", s3_url).exit_code == 0


def test_storage_options_and_s3_checkpoint_without_aws_env(s3_endpoint, s3_url, s3fs_fresh, cli):
    """Everything through --storage-option (no AWS variables at all), teacher weights from S3."""
    ckpt = s3_url + "/weights/teacher.pt"
    buf = io.BytesIO()
    torch.save(ToyNet(seed=1).state_dict(), buf)
    s3fs_fresh.pipe_file(ckpt.removeprefix("s3://"), buf.getvalue())

    env = subprocess_env()
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(var, None)
    opts = []
    for pair in (f"endpoint_url={s3_endpoint}", "key=testing", "secret=testing"):
        opts += ["--storage-option", pair]
    out = s3_url + "/cache"
    args = cli_args(out, "--checkpoint", ckpt, "--features", "body", "--codec", "dense", *opts)
    res = subprocess.run(
        kdcache_cmd(*args), cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    check = cli("verify", out, *opts)
    assert check.exit_code == 0, check.stderr

    r = CacheReader(out)
    assert r.manifest["teacher"]["spec"] == TEACHER
    got = np.concatenate([r.read_shard(i)["logits"] for i in range(len(r.shards))])
    z1, _, _ = teacher_outputs(50, {"seed": 1})
    z0, _, _ = teacher_outputs(50)
    np.testing.assert_allclose(got.astype(np.float32), z1 / 4.0, rtol=1e-3, atol=1e-3)
    assert not np.allclose(got.astype(np.float32), z0 / 4.0, atol=1e-2)  # the weights mattered


def test_exit_codes_and_json_logs_for_schedulers(s3_url, cli, s3fs_fresh):
    """0 done / hit, 2 bad usage, 75 locked by a live run elsewhere; --log-json is JSON lines."""
    lock = {"host": "another-host", "pid": 1, "token": "t", "heartbeat": time.time()}
    s3fs_fresh.pipe_file(s3_url.removeprefix("s3://") + "/_lock.json", json.dumps(lock).encode())
    locked = cli(*cli_args(s3_url))
    assert locked.exit_code == 75
    assert "locked by pid 1 on another-host" in locked.stderr
    s3fs_fresh.rm_file(s3_url.removeprefix("s3://") + "/_lock.json")

    assert cli(*cli_args(s3_url, "--temperature", "0")).exit_code == 2

    done = cli(*cli_args(s3_url, "--log-json"))
    assert done.exit_code == 0, done.stderr
    assert done.stderr.strip() == ""  # --quiet: no progress bar, no info logs
    [result] = [json.loads(line) for line in done.stdout.splitlines()]
    assert result["status"] == "done" and result["url"] == s3_url

    forced = cli(*cli_args(s3_url, "--log-json", "--temperature", "2", "--force"))
    assert forced.exit_code == 0
    logs = [json.loads(line) for line in forced.stderr.splitlines()]
    assert any(d["level"] == "warning" and "--force" in d["message"] for d in logs)
    assert json.loads(forced.stdout)["status"] == "done"

    hit = cli(*cli_args(s3_url, "--log-json", "--temperature", "2"))
    assert hit.exit_code == 0 and json.loads(hit.stdout)["status"] == "hit"


@pytest.mark.parametrize("workers", [0, 2])
def test_short_training_from_an_s3_cache_into_s3(s3_url, cli, s3fs_fresh, workers):
    """Stage two end to end on object storage: --cache and --out both s3://, then evaluate.
    With DataLoader workers, each forked worker must open its own S3 client."""
    cache, out = s3_url + "/cache", s3_url + "/student"
    assert cli(*cli_args(cache, "--features", "body", n=64)).exit_code == 0
    train = toy_train_args(
        cache, out, 64, "--beta", "1", "--student-features", "body", "--epochs", "1",
        "--batch-size", "16", "--prefetch", "1", "--num-workers", str(workers), "--quiet",
    )  # fmt: skip
    res = cli(*train, "--log-json")
    assert res.exit_code == 0, res.stderr
    [report] = [json.loads(line) for line in res.stdout.splitlines()]
    assert report["status"] == "done" and report["final"]["epoch"] == 1

    root = out.removeprefix("s3://")
    names = {k.rsplit("/", 1)[-1] for k in s3fs_fresh.find(root)}
    assert {"summary.json", "model.pt", "metrics.csv", "checkpoint-1.pt"} <= names, names
    summary = json.loads(s3fs_fresh.cat_file(root + "/summary.json"))
    assert summary["cache_fingerprint"] == CacheReader(cache).fingerprint
    assert summary["cache"] == cache

    again = cli(*train)  # the same command on a finished run does nothing
    assert again.exit_code == 0 and "already trained" in again.stdout

    ev = cli("evaluate", "--checkpoint", out, "--data", DATA, "--data-arg", "n=64", "--json")
    assert ev.exit_code == 0, ev.stderr
    assert json.loads(ev.stdout)["n"] == 64


def test_stream_workers_fork_after_the_parent_opened_s3(s3_url, cli):
    """DataLoader workers forked from a process whose reader already talks to S3 (Parquet and
    Zarr clients included) read every row once, with the features the parent reads."""
    from kdcache.storage.stream import CacheStream

    assert cli(*cli_args(s3_url, "--features", "body", n=64)).exit_code == 0
    reader = CacheReader(s3_url)
    want = reader.read_features(0, 64)  # opens the feature array (and its S3 client) here
    reader.read_shard(0)
    stream = CacheStream(reader, batch_size=8, shuffle=False, num_workers=2)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    batches = list(loader)
    ids = np.concatenate([b["sample_id"].numpy() for b in batches])
    feats = np.concatenate([b["features"].numpy() for b in batches])
    assert sorted(ids) == list(range(64))
    np.testing.assert_array_equal(feats, want[ids])


def test_lock_is_an_exclusive_create_on_s3(s3_url, s3fs_fresh):
    # S3 has no rename, but a conditional PUT (If-None-Match: *) gives the lock its one winner.
    from kdcache.storage.errors import LockedError
    from kdcache.storage.fsio import open_location
    from kdcache.storage.lock import StoreLock

    loc = open_location(s3_url)
    with StoreLock(loc) as first:
        with pytest.raises(FileExistsError):
            loc.create_bytes(b"{}", "_lock.json")
        with pytest.raises(LockedError, match="locked by pid"):
            StoreLock(open_location(s3_url)).acquire()
        first.check()
    assert not s3fs_fresh.exists(s3_url.removeprefix("s3://") + "/_lock.json")
