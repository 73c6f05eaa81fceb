"""Promises the docs make about real runs, each tested against real processes: Ctrl-C exits 130,
a run whose stale lock a second process took over stops before its manifest, and a retrained
teacher's checkpoint is refused into the same --out."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys

import torch

from kdcache.storage.reader import CacheReader
from tests.conftest import REPO, assert_one_line_error, cli_args, kdcache_cmd, wait_for
from tests.toy_models import ToyNet

SLOW = ["--teacher-arg", "sleep=0.15"]  # 96 rows, 6 shards, ~2 s: slow enough to interrupt


def _start(args) -> subprocess.Popen:
    return subprocess.Popen(
        kdcache_cmd(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def test_ctrl_c_exits_130_frees_the_lock_and_the_rerun_resumes(tmp_path, cli):
    out = tmp_path / "store"
    args = cli_args(out, *SLOW, n=96)
    proc = _start(args)
    wait_for(lambda: list((out / "_commits").glob("*.json")), proc, 90, "a commit")
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "kdcache: interrupted; rerun the same command to resume", stderr
    assert not (out / "_lock.json").exists() and not (out / "manifest.json").exists()
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    assert CacheReader(str(out)).verify() == []


TAKE_OVER = """
import sys, time
from kdcache.storage.fsio import open_location
from kdcache.storage.lock import StoreLock
lock = StoreLock(open_location(sys.argv[1]), stale_after=0)  # the running writer looks stale
sys.stdin.readline()  # imported and ready: take the lock when told
lock.acquire()
print(lock.token, flush=True)
lock._stop.set()  # hold the lock without a heartbeat, then leave it behind
"""


def test_a_run_whose_lock_was_taken_over_stops_before_its_manifest(tmp_path, cli):
    out = tmp_path / "store"
    args = cli_args(out, *SLOW, n=96)
    thief = subprocess.Popen(
        [sys.executable, "-c", TAKE_OVER, str(out)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc = _start(args)
    wait_for(lambda: list((out / "_commits").glob("*.json")), proc, 90, "a commit")
    token = thief.communicate("go\n", timeout=60)[0].strip()
    assert thief.returncode == 0 and len(token) == 32
    stderr = proc.communicate(timeout=90)[1].decode()
    assert proc.returncode == 75, stderr
    assert_one_line_error(stderr, "this run lost its lock")
    assert not (out / "manifest.json").exists()
    assert json.loads((out / "_lock.json").read_text())["token"] == token  # not deleted by it
    # The thief is gone (its pid is dead on this host): the same command finishes the store.
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    assert CacheReader(str(out)).verify() == []


def test_a_retrained_teacher_checkpoint_is_refused_into_the_same_out(tmp_path, cli):
    ckpt = tmp_path / "teacher.pt"
    out = tmp_path / "store"
    torch.save(ToyNet(seed=1).state_dict(), ckpt)
    assert cli(*cli_args(out, "--checkpoint", ckpt)).exit_code == 0
    first = json.loads((out / "manifest.json").read_text())
    # The same path, retrained weights: the fingerprint holds the weights, not the path.
    buf = io.BytesIO()
    torch.save(ToyNet(seed=2).state_dict(), buf)
    ckpt.write_bytes(buf.getvalue())
    res = cli(*cli_args(out, "--checkpoint", ckpt))
    assert res.exit_code == 2
    assert_one_line_error(
        res.stderr, f"{out} holds a cache made with other settings", "teacher.weights_sha256",
        "use another --out, or --force",
    )  # fmt: skip
    assert json.loads((out / "manifest.json").read_text()) == first  # untouched
    assert cli(*cli_args(out, "--checkpoint", ckpt, "--force")).exit_code == 0
    again = json.loads((out / "manifest.json").read_text())
    assert again["teacher"]["weights_sha256"] != first["teacher"]["weights_sha256"]
