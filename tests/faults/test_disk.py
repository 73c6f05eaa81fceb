"""The local disk fails under a running precompute: full (a small tmpfs), read-only (from the
start, or remounted read-only mid-run), and two hosts writing one local folder.

A full disk and a read-only filesystem are real here: a tmpfs mounted for the case (root and
CAP_SYS_ADMIN needed; without them those cases are skipped and say so, as bare root would write
through a chmod 555 folder anyway).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from kdcache.storage import faults
from kdcache.storage.reader import CacheReader
from tests.conftest import assert_one_line_error, cli_args, wait_for
from tests.faults.conftest import exit_text, last_line, start_with_fault, stopped
from tests.faults.test_kill_precompute import assert_like_reference, manifest_of, store_files
from tests.faults.test_s3_outage import two_hosts

N = 96


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True
    )
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True)


def test_full_disk_then_rerun_after_space_is_freed(tmp_path, cli, fault_row):
    count = tmp_path / "forwards.txt"
    extra = ("--features", "body", "--teacher-arg", f"count_file={count}")
    row = fault_row(
        kind="storage", case="full disk (tmpfs of 48 KiB)", fault="ENOSPC while writing shards"
    )
    ref = tmp_path / "reference"
    assert cli(*cli_args(ref, *extra, n=N)).exit_code == 0
    # 48 KiB: the run header, the feature array's metadata and the first shards fit (each shard
    # takes pages for its Parquet file, its feature chunk and its marker), the rest does not.
    with tmpfs(tmp_path / "disk", "48k") as disk:
        out = disk / "store"
        args = cli_args(out, *extra, n=N)
        before = count.read_text().count("\n")
        res = cli(*args)
        line = last_line(res.stderr)
        committed = len(list((out / "_commits").glob("*.json")))
        assert res.exit_code == 1, res.stderr
        assert_one_line_error(res.stderr, "no space left", str(out), "rerun the same command")
        assert 1 <= committed < 6, committed  # what was committed before the disk filled stays
        assert not (out / "manifest.json").exists()
        before = count.read_text().count("\n")

        remount(disk, "size=4m")  # space freed
        again = cli(*args)
        assert again.exit_code == 0, again.stderr
        recomputed = count.read_text().count("\n") - before
        assert recomputed == 1 + 2 * (6 - committed)  # the probe + only the missing shards
        assert_like_reference(out, (store_files(ref), manifest_of(ref)))
    row.update(
        seen=line,
        exit=exit_text(res.exit_code),
        recovery=f"space freed (remount 4 MiB), rerun the same command: {committed} shard(s) "
        f"kept, {6 - committed} recomputed; the store equals an uninterrupted one",
    )


def read_only_out(tmp_path: Path) -> contextlib.AbstractContextManager:
    """A folder nobody may write into: a read-only tmpfs as root, chmod 555 otherwise."""
    if os.geteuid() == 0:
        return tmpfs(tmp_path / "ro", "1m", read_only=True)

    @contextlib.contextmanager
    def chmod():
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)

    return chmod()


def test_read_only_out_is_refused(tmp_path, cli, fault_row):
    kind = "read-only tmpfs" if os.geteuid() == 0 else "chmod 555 folder"
    row = fault_row(
        kind="storage",
        case=f"read-only --out ({kind})",
        fault="--out inside a folder that cannot be written",
    )
    with read_only_out(tmp_path) as folder:
        out = folder / "store"
        res = cli(*cli_args(out, n=N))
        assert res.exit_code == 2, res.stderr
        assert_one_line_error(res.stderr, f"cannot write to --out {out}", "writable location")
        assert not out.exists()
    row.update(
        seen=last_line(res.stderr),
        exit=exit_text(res.exit_code),
        recovery="choose a writable --out; nothing was written",
    )


def test_out_turns_read_only_mid_run(tmp_path, cli, fault_row):
    """The filesystem is remounted read-only after shard 1's marker (the process is stopped
    there), then made writable again for the rerun."""
    row = fault_row(
        kind="storage",
        case="--out remounted read-only mid-run",
        fault="EROFS after 2 shards committed",
    )
    ref = tmp_path / "reference"
    assert cli(*cli_args(ref, "--features", "body", n=N)).exit_code == 0
    with tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "store"
        args = cli_args(out, "--features", "body", n=N)
        proc = start_with_fault(args, "shard.marker:2:STOP")
        wait_for(lambda: stopped(proc), proc, 120, "the stop after shard 1")
        remount(disk, "ro")
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        remount(disk, "rw")
        assert proc.returncode == 2, err
        assert_one_line_error(err, "cannot write to", str(out), "rerun the same command")
        assert not (out / "manifest.json").exists()
        committed = len(list((out / "_commits").glob("*.json")))
        assert committed == 2
        again = cli(*args)
        assert again.exit_code == 0, again.stderr
        assert_like_reference(out, (store_files(ref), manifest_of(ref)))
        assert CacheReader(str(out)).verify() == []
    row.update(
        seen=last_line(err),
        exit=exit_text(proc.returncode),
        recovery="made writable again, rerun the same command: 2 shards kept; the store equals "
        "an uninterrupted one (the stale lock of the dead run is taken over)",
    )


def test_two_hosts_on_one_local_folder(tmp_path, cli, fault_row):
    two_hosts(str(tmp_path / "store"), cli, fault_row, "local-folder", lambda: None)


class FullMemoryFS(MemoryFileSystem):
    """fsspec's memory filesystem with a quota: a write that would pass `quota` bytes (all files
    below /full) fails as a full disk does, with ENOSPC. It stands in for the tmpfs where
    mounting is not permitted, and takes the object-store write path (whole-file PUTs)."""

    protocol = "fullmem"
    quota: int | None = None

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("fullmem://"))

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        if self.quota is not None:
            used = sum(len(f.getvalue()) for p, f in self.store.items() if p.startswith("/full"))
            if used + len(value) > self.quota:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return super().pipe_file(path, value, mode=mode, **kwargs)


def test_full_store_simulated_then_rerun(tmp_path, cli, fault_row):
    """The same as the tmpfs case through a filesystem that runs out of quota: runs everywhere."""
    fsspec.register_implementation("fullmem", FullMemoryFS, clobber=True)
    ref = tmp_path / "reference"
    assert cli(*cli_args(ref, "--features", "body", n=N)).exit_code == 0
    want = store_files(ref)
    url = f"fullmem://full/{uuid.uuid4().hex}"
    fs = FullMemoryFS()
    FullMemoryFS.quota = sum(map(len, want.values())) // 2
    try:
        args = cli_args(url, "--features", "body", n=N)
        res = cli(*args)
        committed = len(fs.ls(url + "/_commits")) if fs.exists(url + "/_commits") else 0
        assert res.exit_code == 1, res.stderr
        root = fs._strip_protocol(url)  # the exception names the file inside the filesystem
        assert_one_line_error(res.stderr, "no space left", root, "rerun the same command")
        assert 1 <= committed < 6, committed
        assert not fs.exists(url + "/manifest.json")
        FullMemoryFS.quota = None  # space freed
        again = cli(*args)
        assert again.exit_code == 0, again.stderr
        got = {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}
        assert {k: v for k, v in got.items() if k != "manifest.json"} == want
    finally:
        FullMemoryFS.quota = None
        fs.rm(fs._strip_protocol(url), recursive=True)
    fault_row(
        kind="storage",
        case="full store (simulated: fsspec filesystem with a byte quota)",
        fault="ENOSPC from a write past half the store's size",
        seen=last_line(res.stderr).replace(root, "/full/<id>"),
        exit=exit_text(res.exit_code),
        recovery=f"quota lifted, rerun the same command: {committed} shard(s) kept; every file "
        "equals an uninterrupted local run's",
    )


def test_full_disk_under_train_then_rerun(tmp_path, cli, fault_row):
    """A student's --out on a tmpfs that fills at its second checkpoint."""
    from tests.faults.test_kill_train import STEPS, assert_same, outcome, train_args

    row = fault_row(
        kind="storage",
        case="full disk under train (tmpfs of 1.5 checkpoints)",
        fault="ENOSPC while writing checkpoint-2.pt",
    )
    cache = tmp_path / "cache"
    assert cli(*cli_args(cache, "--features", "body", n=48)).exit_code == 0
    ref = tmp_path / "ref" / "student"
    assert cli(*train_args(cache, ref)).exit_code == 0
    size = (ref / "checkpoint-3.pt").stat().st_size
    with tmpfs(tmp_path / "disk", f"{(size * 3 // 2) // 4096 * 4096 + 4096}") as disk:
        out = disk / "student"
        args = train_args(cache, out)
        res = cli(*args)
        left = sorted(p.name for p in out.iterdir())
        assert res.exit_code == 1, res.stderr
        assert_one_line_error(res.stderr, "no space left", str(out / "checkpoint-2.pt"))
        assert "summary.json" not in left and "checkpoint-1.pt" in left
        remount(disk, "size=8m")
        before = faults.reached.copy()
        again = cli(*args)
        ran = faults.reached - before
        assert again.exit_code == 0, again.stderr
        assert (ran["train.epoch"], ran["train.batch"]) == (2, 2 * STEPS)  # from checkpoint-1
        assert_same(outcome(out), outcome(ref))
    row.update(
        seen=last_line(res.stderr),
        exit=exit_text(res.exit_code),
        recovery=f"space freed, rerun the same command: epoch 1 kept, {ran['train.epoch']} "
        f"trained ({ran['train.batch']} steps, measured); weights and metrics equal an "
        "uninterrupted run's",
    )
