"""The `kdcache` command: messages and exit codes in-process (click), real processes for the rest."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from kdcache.storage.errors import FormatError
from kdcache.storage.reader import CacheReader
from tests.conftest import (
    REPO,
    assert_one_line_error,
    cli_args,
    files_under,
    kdcache_cmd,
    wait_for,
)
from tests.toy_models import FORBID_ENV


def test_precompute_inspect_verify(tmp_path, cli):
    out = tmp_path / "s"
    res = cli(*cli_args(out, "--features", "body", "--top-k", "3", "--temperature", "2"))
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith(f"wrote 50 rows in 4 shards to {out}")

    res = cli("inspect", out)
    assert res.exit_code == 0
    table = dict(line.split(None, 1) for line in res.stdout.strip().splitlines())
    assert table["rows"] == "50" and table["shards"] == "4" and table["codec"] == "topk"
    assert table["temperature"] == "2" and table["top_k"] == "3" and table["feature_dim"] == "16"
    for key in ("bytes_per_sample", "teacher_accuracy", "mean_topk_kl", "mean_residual_mass"):
        float(table[key])

    summary = json.loads(cli("inspect", out, "--json").stdout)
    m = CacheReader(str(out)).manifest
    assert summary["rows"] == 50 and summary["shards"] == 4 and summary["codec"] == "topk"
    assert summary["temperature"] == 2.0 and summary["top_k"] == 3 and summary["feature_dim"] == 16
    assert summary["disk_bytes_per_sample"] == pytest.approx(m["stats"]["total_bytes"] / 50)
    # the payload: ids (8) + view (4) + label (8) + 3 x (int32 + float16) + lse (4) + 16 x float16
    assert summary["bytes_per_sample"] == 8 + 4 + 8 + 3 * 6 + 4 + 16 * 2
    assert summary["soft_labels"] == "top-3 of 10 classes"
    assert summary["teacher_accuracy"] == m["stats"]["teacher_accuracy"]
    assert 0 < summary["mean_topk_kl"] == m["stats"]["mean_topk_kl"]

    res = cli("verify", out)
    assert res.exit_code == 0 and res.stdout.startswith(f"ok: {out}: 50 rows, 4 shards, 9 files")


def test_log_json_result(tmp_path, cli):
    res = cli(*cli_args(tmp_path / "s", "--log-json"))
    doc = json.loads(res.stdout)
    assert doc["status"] == "done" and doc["rows"] == 50 and doc["resumed_shards"] == 0
    doc = json.loads(cli(*cli_args(tmp_path / "s", "--log-json")).stdout)
    assert doc["status"] == "hit"


def test_config_file(tmp_path, cli):
    cfg = tmp_path / "job.toml"
    cfg.write_text(
        'teacher = "tests.toy_models:ToyNet"\ndata = "tests.toy_models:ToyData"\n'
        "data_args = { n = 20 }\ntop-k = 2\nshard_rows = 8\nquiet = true\n"
    )
    res = cli("precompute", "--config", cfg, "--out", tmp_path / "s", "--temperature", "3")
    assert res.exit_code == 0, res.stderr
    r = CacheReader(str(tmp_path / "s"))
    assert (r.num_rows, r.codec.k, r.temperature, len(r.shards)) == (20, 2, 3.0, 3)
    cfg.write_text('teacher = "tests.toy_models:ToyNet"\nbogus = 1\n')
    res = cli("precompute", "--config", cfg, "--data", "x:y", "--out", tmp_path / "t")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "unknown option(s) ['bogus']")


def test_cache_hit_runs_no_forward_in_a_real_process(tmp_path, cli, kdcache_proc):
    out = tmp_path / "s"
    assert cli(*cli_args(out)).exit_code == 0
    # With the variable set, any teacher forward raises; a fresh store proves it.
    fresh = cli(*cli_args(tmp_path / "other"), env={FORBID_ENV: "1"})
    assert fresh.exit_code == 1 and "forbidden" in fresh.stderr
    proc = kdcache_proc(*cli_args(out, "--batch-size", "5"), env={FORBID_ENV: "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"cache hit: {out} already holds this cache")


def test_changed_settings_are_refused_naming_the_field_and_force_replaces(tmp_path, cli):
    out = tmp_path / "s"
    assert cli(*cli_args(out)).exit_code == 0
    res = cli(*cli_args(out, "--temperature", "2", "--top-k", "5"))
    assert res.exit_code == 2
    assert_one_line_error(
        res.stderr,
        "other settings",
        "soft_labels.top_k: 8 -> 5",
        "temperature: 4.0 -> 2.0",
        "--force",
    )
    assert CacheReader(str(out)).temperature == 4.0
    res = cli(*cli_args(out, "--temperature", "2", "--top-k", "5", "--force"))
    assert res.exit_code == 0 and "wrote 50 rows" in res.stdout
    r = CacheReader(str(out))
    assert (r.temperature, r.codec.k) == (2.0, 5) and r.verify() == []
    assert "cache hit" in cli(*cli_args(out, "--temperature", "2", "--top-k", "5")).stdout


def test_force_never_replaces_a_foreign_folder(tmp_path, cli):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    res = cli(*cli_args(out, "--force"))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "is not a kdcache store (thesis.tex")
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_force_with_a_bad_option_keeps_the_old_store(tmp_path, cli):
    out = tmp_path / "s"
    assert cli(*cli_args(out)).exit_code == 0
    res = cli(*cli_args(out, "--top-k", "11", "--force"))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--top-k 11 exceeds the teacher's 10 classes")
    assert CacheReader(str(out)).verify() == []


def test_force_replaces_an_unknown_format_version(tmp_path, cli):
    out = tmp_path / "s"
    assert cli(*cli_args(out)).exit_code == 0
    doc = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**doc, "format": "kdcache/9"}))
    res = cli(*cli_args(out))
    assert res.exit_code == 1
    assert_one_line_error(res.stderr, str(out), "'kdcache/9'", "--force")
    assert cli(*cli_args(out, "--force")).exit_code == 0
    assert CacheReader(str(out)).manifest["format"] == "kdcache/2"


def _flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("key", ["soft_labels/part-00001.parquet", "features.zarr/c/2/0"])
def test_verify_catches_a_flipped_byte(tmp_path, cli, key):
    out = tmp_path / "s"
    assert cli(*cli_args(out, "--features", "body")).exit_code == 0
    _flip(out / key)
    res = cli("verify", out)
    assert res.exit_code == 65 and "Traceback" not in res.stderr
    assert f"{out / key}: checksum mismatch" in res.stderr
    assert res.stderr.startswith(f"kdcache: error: {out}: 1 problem(s):")


def test_inspect_and_verify_refuse_incomplete_and_missing(tmp_path, cli):
    out = tmp_path / "s"
    assert cli(*cli_args(out)).exit_code == 0
    (out / "manifest.json").unlink()
    for command in ("inspect", "verify"):
        res = cli(command, out)
        assert res.exit_code == 1
        assert_one_line_error(res.stderr, "incomplete kdcache store")
    res = cli("inspect", tmp_path / "none")
    assert res.exit_code == 1
    assert_one_line_error(res.stderr, "not a kdcache store")


def _pid_on_this_host_that_is_gone() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_live_lock_exits_75_naming_the_owner(tmp_path, kdcache_proc, cli):
    out = tmp_path / "s"
    out.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {
            "host": socket.gethostname(),
            "pid": owner.pid,
            "token": "t",
            "heartbeat": time.time(),
        }
        (out / "_lock.json").write_text(json.dumps(lock))
        proc = kdcache_proc(*cli_args(out))
        assert proc.returncode == 75
        assert_one_line_error(proc.stderr, f"locked by pid {owner.pid}")
        assert not (out / "manifest.json").exists()
    finally:
        owner.kill()
        owner.wait()
    # The same lock, its owner now dead: taken over, and released at the end.
    res = cli(*cli_args(out))
    assert res.exit_code == 0, res.stderr
    assert not (out / "_lock.json").exists()


def test_stale_heartbeat_is_taken_over(tmp_path, cli):
    out = tmp_path / "s"
    out.mkdir()
    lock = {"host": "elsewhere", "pid": 1, "token": "t", "heartbeat": time.time() - 3600}
    (out / "_lock.json").write_text(json.dumps(lock))
    assert cli(*cli_args(out)).exit_code == 0


def _bad_cases(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return {
        "no-colon": (
            ["--teacher", "tests.toy_models.ToyNet"],
            2,
            "not of the form package.module:attr",
        ),
        "no-import": (["--teacher", "nope.nothing:X"], 2, "cannot import 'nope.nothing'"),
        "wrong-shape": (
            ["--teacher", "tests.toy_models:WrongShapeNet"],
            2,
            "returned shape (2, 10, 2)",
        ),
        "nan": (
            ["--teacher", "tests.toy_models:NaNNet"],
            2,
            "NaN/Inf outputs for sample_id [0, 1]",
        ),
        "inf": (
            ["--teacher", "tests.toy_models:NaNNet", "--teacher-arg", "inf=true"],
            2,
            "NaN/Inf",
        ),
        "empty": (["--data", "tests.toy_models:EmptyData"], 2, "is empty"),
        "label": (["--data", "tests.toy_models:BadLabelData"], 2, "label 99 of sample_id 30"),
        "t-zero": (["--temperature", "0"], 2, "--temperature 0.0 must be > 0"),
        "t-neg": (["--temperature", "-2"], 2, "--temperature -2.0 must be > 0"),
        "k-zero": (["--top-k", "0"], 2, "--top-k 0 must be >= 1"),
        "k-big": (["--top-k", "11"], 2, "--top-k 11 exceeds the teacher's 10 classes"),
        "features": (["--features", "head2"], 2, "--features 'head2' is not a submodule of ToyNet"),
        "teacher-arg": (["--teacher-arg", "colour"], 2, "--teacher-arg 'colour' is not key=value"),
        "unwritable": (
            ["--out", blocker / "store"],
            2,
            f"cannot write to --out {blocker / 'store'}",
        ),
    }


BAD_IDS = [
    "no-colon",
    "no-import",
    "wrong-shape",
    "nan",
    "inf",
    "empty",
    "label",
    "t-zero",
    "t-neg",
    "k-zero",
    "k-big",
    "features",
    "teacher-arg",
    "unwritable",
]


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_is_one_line_with_exit_code_and_no_manifest(tmp_path, cli, case):
    extra, code, message = _bad_cases(tmp_path)[case]
    out = tmp_path / "s"
    args = cli_args(out, *map(str, extra))
    res = cli(*args)
    assert res.exit_code == code, res.stderr
    assert_one_line_error(res.stderr, message)
    assert not (out / "manifest.json").exists()
    assert not list(tmp_path.rglob("manifest.json"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--pool", "max"], "'max' is not one of"),
        (["--codec", "zip"], "'zip' is not one of"),
        (["--top-k", "many"], "'many' is not a valid integer"),
    ],
)
def test_click_usage_errors_exit_2(tmp_path, cli, args, needle):
    res = cli(*cli_args(tmp_path / "s", *args))
    assert res.exit_code == 2 and needle in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "s").exists()


def test_missing_required_option(cli):
    res = cli(
        "precompute", "--teacher", "tests.toy_models:ToyNet", "--data", "tests.toy_models:ToyData"
    )
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "missing --out")


def test_usage_error_exit_code_in_a_real_process(tmp_path, kdcache_proc):
    proc = kdcache_proc(*cli_args(tmp_path / "s", "--teacher", "tests.toy_models.ToyNet"))
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "not of the form package.module:attr")
    assert proc.stdout == ""


def test_memory_url(cli, memory_url):
    assert cli(*cli_args(memory_url, "--features", "body")).exit_code == 0
    res = cli("verify", memory_url)
    assert res.exit_code == 0 and "ok:" in res.stdout
    assert "cache hit" in cli(*cli_args(memory_url, "--features", "body")).stdout


def test_resume_after_kill_9_is_byte_identical(tmp_path, cli):
    """Kill -9 a run mid-way; rerunning the same command finishes it with the same bytes as a
    run that was never interrupted, recomputing only the shards that had no commit marker."""
    out, ref = tmp_path / "killed", tmp_path / "reference"
    count = tmp_path / "forwards.txt"
    n, shards, per_shard = 96, 6, 2  # 16 rows per shard in batches of 8
    teacher = ["--teacher-arg", "sleep=0.15", "--features", "body", "--teacher-arg"]
    args = cli_args(out, *teacher, f"count_file={count}", n=n)

    # The run kills itself right after its second commit marker (kdcache.storage.faults): no
    # polling race, exactly two shards committed however loaded the machine is.
    env = {**os.environ, "KDCACHE_FAULT": "shard.marker:2"}
    killed = subprocess.run(kdcache_cmd(*args), cwd=REPO, env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    committed = len(list((out / "_commits").glob("*.json")))
    assert committed == 2 < shards, committed
    assert not (out / "manifest.json").exists()
    assert (out / "_lock.json").exists()  # left behind by the dead process
    with pytest.raises(FormatError, match="incomplete"):
        CacheReader(str(out))
    forwards_before = count.read_text().count("\n")

    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    rerun_forwards = count.read_text().count("\n") - forwards_before
    assert rerun_forwards == 1 + per_shard * (shards - committed)  # probe + the missing shards
    assert json.loads(cli(*args, "--log-json").stdout)["status"] == "hit"

    res = cli(*cli_args(ref, *teacher, f"count_file={tmp_path / 'ref.txt'}", n=n))
    assert res.exit_code == 0, res.stderr
    got, want = files_under(out), files_under(ref)
    assert sorted(got) == sorted(want) and len(got) == 2 * shards + 1
    for key in want:
        assert got[key] == want[key], key
    assert CacheReader(str(out)).verify() == []
    assert not (out / "_lock.json").exists()


def test_sigterm_releases_the_lock_and_the_rerun_resumes(tmp_path, cli):
    """Schedulers stop jobs with SIGTERM: the run unwinds, frees its lock (a requeued job need
    not wait for it to go stale), keeps its committed shards and exits 143."""
    out = tmp_path / "store"
    args = cli_args(out, "--teacher-arg", "sleep=0.15", n=96)
    proc = subprocess.Popen(
        kdcache_cmd(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wait_for(lambda: list((out / "_commits").glob("*.json")), proc, 90, "a commit")
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM); rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    assert not (out / "_lock.json").exists() and not (out / "manifest.json").exists()
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    assert CacheReader(str(out)).verify() == []


@contextlib.contextmanager
def read_only_folder(path):
    """`path` made read-only for this process even as root (CI runs tests as root): chmod for a
    user, the immutable attribute (chattr +i) for root, which root's writes cannot bypass."""
    path.mkdir()
    root = os.geteuid() == 0
    if root and (
        not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)]).returncode
    ):
        pytest.skip("root cannot make a folder read-only here (chattr +i is not permitted)")
    if not root:
        path.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            (path / "probe").touch()  # the folder really refuses writes
        yield path
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(0o755)


@pytest.mark.parametrize("inside", [True, False])
def test_read_only_folder_is_refused(tmp_path, cli, inside):
    with read_only_folder(tmp_path / "ro") as locked:
        out = locked / "store" if inside else locked
        res = cli(*cli_args(out))
        assert res.exit_code == 2, res.stderr
        assert_one_line_error(res.stderr, f"cannot write to --out {out}")
        assert not list(locked.iterdir())
