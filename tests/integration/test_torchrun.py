"""Both stages under `torchrun --standalone --nproc-per-node 2` with gloo on CPU.

Every run here, single-process references included, is a subprocess with OMP_NUM_THREADS=1
(torchrun sets that for its workers anyway) and precompute runs with --threads 1 besides: with the
same thread count the teacher's float arithmetic is the same, so stores can be compared byte for
byte (the conditions of the promise: stages/precompute/conditions.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from kdcache.storage.reader import CacheReader
from tests.conftest import (
    DATA,
    REPO,
    TEACHER,
    THREADS,
    files_under,
    kdcache_cmd,
    toy_precompute,
    wait_for,
)
from tests.integration.conftest import (
    run_proc,
    s3_objects,
    subprocess_env,
    torchrun,
    toy_train_args,
)

pytestmark = pytest.mark.distributed

N, SHARD_ROWS, BATCH = 100, 16, 8  # 7 shards: rank 0 takes 0, 2, 4, 6 and rank 1 takes 1, 3, 5
SHARDS = -(-N // SHARD_ROWS)


def precompute_args(out, *extra: str, teacher: str = TEACHER) -> list[str]:
    return [
        "precompute",
        "--teacher",
        teacher,
        "--data",
        DATA,
        "--data-arg",
        f"n={N}",
        "--out",
        str(out),
        "--shard-rows",
        str(SHARD_ROWS),
        "--batch-size",
        str(BATCH),
        "--features",
        "body",
        "--device",
        "cpu",
        *THREADS,
        "--quiet",
        *extra,
    ]


def forwards(path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


# Loaded into every Python process through PYTHONPATH: logs each write under PREFIX (open for
# writing, rename, remove) to a per-process file named after torchrun's RANK, so a test can see
# which rank touched the output folder without changing the code under test.
AUDIT = """
import os, sys
_dir, _prefix = os.environ.get("KDCACHE_AUDIT_DIR"), os.environ.get("KDCACHE_AUDIT_PREFIX")
if _dir and _prefix:
    _fd = os.open(os.path.join(_dir, f"rank-{os.environ.get('RANK', 'none')}-{os.getpid()}.log"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _w = os.O_WRONLY | os.O_RDWR
    def _hook(event, args):
        if event == "open" and isinstance(args[0], str) and args[2] & _w:
            paths = [args[0]]
        elif event in ("os.rename", "os.remove") and isinstance(args[0], str):
            paths = [a for a in args[:2] if isinstance(a, str)]
        else:
            return
        for p in paths:
            if os.path.abspath(p).startswith(_prefix):
                os.write(_fd, f"{event} {p}\\n".encode())
    sys.addaudithook(_hook)
"""


def audited_env(tmp_path, prefix) -> tuple[dict, object]:
    site, logs = tmp_path / "audit-site", tmp_path / "audit-logs"
    site.mkdir()
    logs.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    env = subprocess_env(KDCACHE_AUDIT_DIR=str(logs), KDCACHE_AUDIT_PREFIX=str(prefix))
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return env, logs


def writes_by_rank(logs) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in logs.glob("rank-*.log"):
        out.setdefault(f.name.split("-")[1], []).extend(f.read_text().splitlines())
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process store every distributed run here must reproduce: (files, shard entries).

    DyingNet computes what ToyNet does, so one reference serves the dying-rank test too.
    """
    out = tmp_path_factory.mktemp("reference") / "store"
    res = run_proc(kdcache_cmd(*precompute_args(out)))
    assert res.returncode == 0, res.stderr
    files = files_under(out)
    assert len(files) == 2 * SHARDS + 1  # Parquet + feature chunk per shard, zarr.json
    return files, CacheReader(str(out)).manifest


def test_two_ranks_write_the_same_store_as_one_process(tmp_path, reference):
    two = tmp_path / "two"
    env, logs = audited_env(tmp_path, two)
    res = run_proc(torchrun(2, *precompute_args(two)), env=env)
    assert res.returncode == 0, res.stderr
    # Only rank 0 publishes and reports; rank 1 prints nothing.
    assert res.stdout.count("wrote 100 rows in 7 shards") == 1, res.stdout
    assert not (two / "_lock.json").exists()  # one lock per run, taken and released by rank 0

    # Who wrote what: shard i by rank i % 2, the lock and the manifest by rank 0 alone.
    writes = writes_by_rank(logs)
    for rank, mine in (("0", {0, 2, 4, 6}), ("1", {1, 3, 5})):
        parts = {int(w.split("part-")[1][:5]) for w in writes[rank] if "soft_labels/part-" in w}
        assert parts == mine, (rank, parts)
    assert any("_lock.json" in w for w in writes["0"])
    assert any("manifest.json" in w for w in writes["0"])
    assert not any("_lock.json" in w or "manifest.json" in w for w in writes["1"])

    files, manifest = reference
    assert files_under(two) == files
    got = CacheReader(str(two))
    assert got.fingerprint == manifest["fingerprint"]
    assert got.manifest["shards"] == manifest["shards"]  # files, hashes, rows, teacher stats
    assert got.verify() == []


def test_dead_rank_keeps_committed_shards_and_any_world_resumes(tmp_path, reference):
    """Rank 1 kills itself (os._exit) after 3 forwards: shard 1 committed, shard 3 half done.
    Rank 0 finished shards 0, 2, 4, 6. Rerunning the same command with one process recomputes
    only shards 3 and 5 and gives the store an uninterrupted run gives."""
    out = tmp_path / "store"
    count = tmp_path / "forwards.txt"
    teacher = "tests.integration.toy:DyingNet"
    args = precompute_args(out, "--teacher-arg", f"count_file={count}", teacher=teacher)

    died = run_proc(torchrun(2, *args))
    assert died.returncode != 0
    assert "exitcode  : 17" in died.stderr  # the root cause torchrun reports is our rank 1
    assert not (out / "manifest.json").exists()
    markers = sorted(int(p.stem.split("-")[1]) for p in (out / "_commits").glob("*.json"))
    assert markers == [0, 1, 2, 4, 6]
    kept = {p: p.stat().st_mtime_ns for p in (out / "soft_labels").glob("*.parquet")}
    before = len(forwards(count))

    again = run_proc(kdcache_cmd(*args))
    assert again.returncode == 0, again.stderr
    # The probe batch of 2, then batches of 8 and 7 for each of the 15-row shards 3 and 5.
    assert forwards(count)[before:] == [2, 8, 7, 8, 7]
    for path, mtime in kept.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was rewritten"
    assert not (out / "_lock.json").exists()

    files, manifest = reference
    assert files_under(out) == files
    assert CacheReader(str(out)).manifest["shards"] == manifest["shards"]


@pytest.mark.s3
def test_two_ranks_into_s3_match_a_local_single_process_run(s3_url, s3fs_fresh, reference):
    """The multi-node shape: ranks share nothing but the object store. Then a resume that leaves
    rank 0 idle, then a cache hit."""
    res = run_proc(torchrun(2, *precompute_args(s3_url, "--log-json")))
    assert res.returncode == 0, res.stderr
    [summary] = [json.loads(line) for line in res.stdout.splitlines()]
    assert summary["status"] == "done" and summary["url"] == s3_url
    assert s3_objects(s3fs_fresh, s3_url) == reference[0]
    root = s3_url.removeprefix("s3://")
    assert not s3fs_fresh.exists(root + "/_lock.json")

    # Rank 1's shards lost (and the manifest): on the rerun rank 0 computes nothing, and must still
    # see the markers rank 1 writes meanwhile when it publishes (no stale cached listing).
    s3fs_fresh.rm(
        [root + "/manifest.json"] + [f"{root}/_commits/part-0000{i}.json" for i in (1, 3, 5)]
    )
    res = run_proc(torchrun(2, *precompute_args(s3_url, "--log-json")))
    assert res.returncode == 0, res.stderr[-3000:]
    [summary] = [json.loads(line) for line in res.stdout.splitlines()]
    assert summary["status"] == "done" and summary["resumed_shards"] == 4
    assert s3_objects(s3fs_fresh, s3_url) == reference[0]
    assert CacheReader(s3_url).manifest["shards"] == reference[1]["shards"]

    # A rerun under torchrun is a cache hit on every rank (exit 0, still one report line).
    hit = run_proc(torchrun(2, *precompute_args(s3_url, "--log-json")))
    assert hit.returncode == 0, hit.stderr
    assert [json.loads(line)["status"] for line in hit.stdout.splitlines()] == ["hit"]


def train_args(cache, out, *extra: str) -> list[str]:
    return toy_train_args(cache, out, N, "--batch-size", "10", *extra)


def test_ddp_training_writes_on_rank_0_only_and_resumes_after_sigterm(tmp_path):
    """Two DDP ranks on gloo; torchrun is stopped (SIGTERM, as Slurm preemption does) after
    epoch 1 is checkpointed; the same command resumes from that checkpoint and finishes."""
    cache, out = tmp_path / "cache", tmp_path / "student"
    toy_precompute(cache, data_args={"n": N}, features="body")
    env, logs = audited_env(tmp_path, out)
    # 5 batches of 10 per rank and epoch, 0.05 s each: time enough to stop it inside epoch 2.
    args = train_args(cache, out, "--epochs", "3", "--student-arg", "sleep=0.05", "--log-json")

    proc = subprocess.Popen(
        torchrun(2, *args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for((out / "checkpoint-1.pt").exists, proc, 120, "checkpoint-1.pt")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err.decode()[-3000:]
    assert not (out / "summary.json").exists()
    before = (out / "metrics.csv").read_text().splitlines()  # header + the finished epochs
    assert len(before) >= 2

    res = run_proc(torchrun(2, *args), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    [report] = [json.loads(line) for line in res.stdout.splitlines()]  # rank 0 alone reports
    assert report["status"] == "done" and report["final"]["epoch"] == 3
    assert "resuming" in res.stderr and f"checkpoint-{len(before) - 1}.pt" in res.stderr
    metrics = (out / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 4 and metrics[: len(before)] == before  # kept, not redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["final"]["eval_accuracy"] is not None

    writes = writes_by_rank(logs)
    assert writes.get("0"), "rank 0 wrote nothing?"
    assert "1" not in writes or writes["1"] == [], writes["1"]
    assert any("summary.json" in w for w in writes["0"])


def test_ddp_online_kd_runs_a_teacher_per_rank(tmp_path):
    """Online KD under two DDP ranks: each rank runs its own copy of the teacher (not wrapped in
    DDP: only the student trains); rank 0 records its forward time."""
    out = tmp_path / "student"
    args = [
        "train", "--teacher", TEACHER, "--student", TEACHER, "--student-arg", "seed=5",
        "--data", DATA, "--data-arg", f"n={N}", "--batch-size", "10", "--epochs", "2",
        "--device", "cpu", "--out", out, "--log-json",
    ]  # fmt: skip
    res = run_proc(torchrun(2, *args))
    assert res.returncode == 0, res.stderr[-3000:]
    [report] = [json.loads(line) for line in res.stdout.splitlines()]
    assert report["status"] == "done" and report["final"]["epoch"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_seconds"] > 0 and summary["online_teacher"]["spec"] == TEACHER
    assert summary["settings"]["temperature"] == 4.0 and summary["cache"] is None


MNIST = "kdcache.pipeline.examples.mnist1d:MNIST1D"
STUDENT = "kdcache.pipeline.examples.models:StudentCNN"
# 2 ranks x 64 rows per step = the 128 rows of the single process: same global batch, same steps.


def mnist_train_args(cache, out, *extra: str) -> list[str]:
    """`kdcache train` of a StudentCNN on MNIST-1D; cache None trains on hard labels."""
    return [
        "train",
        *(["--cache", str(cache)] if cache else []),
        "--student",
        STUDENT,
        "--data",
        MNIST,
        "--data-arg",
        "split=train",
        "--eval-data",
        MNIST,
        "--eval-data-arg",
        "split=test",
        "--epochs",
        "20",
        "--lr",
        "1e-2",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def final_accuracy(out) -> float:
    return json.loads((out / "summary.json").read_text())["final"]["eval_accuracy"]


def metrics_without_timing(out) -> list[list[str]]:
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if name not in ("epoch_seconds", "samples_per_sec")]
    return [[r[i] for i in keep] for r in rows]


@pytest.mark.slow
def test_ddp_student_on_mnist1d_learns_and_resumes_exactly(tmp_path):
    """MNIST-1D: a StudentCNN(channels=32) teacher trained on hard labels (~92 % test accuracy),
    its cache, then the default StudentCNN distilled for 20 epochs by 1 process (batch 128) and
    by 2 DDP ranks (batch 64 each, so the same global batch and number of steps): both learn
    (above 75 %; chance is 10 %). That two ranks compute what one process does is
    test_ddp_sync's exact check, not an accuracy band here. The 2-rank run stopped by SIGTERM
    right after checkpoint-5 is written (rank 0 sends it to itself at that point: no polling
    race) and rerun must then equal the uninterrupted one exactly: every metric of every epoch
    (gloo + OMP_NUM_THREADS=1 make the run deterministic)."""
    teacher, cache = tmp_path / "teacher", tmp_path / "cache"
    env = subprocess_env(KDCACHE_DATA_DIR=str(tmp_path / "mnist1d"))  # never the user's ~/.cache
    hard = mnist_train_args(None, teacher, "--student-arg", "channels=32", "--epochs", "15")
    hard += ["--batch-size", "128"]
    assert run_proc(kdcache_cmd(*hard), env).returncode == 0
    assert final_accuracy(teacher) > 0.85
    pre = ["precompute", "--teacher", STUDENT, "--teacher-arg", "channels=32"]
    pre += ["--checkpoint", str(teacher / "model.pt"), "--data", MNIST, "--data-arg", "split=train"]
    pre += ["--out", str(cache), "--features", "features", "--shard-rows", "1000", "--quiet"]
    assert run_proc(kdcache_cmd(*pre), env).returncode == 0

    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    res = run_proc(kdcache_cmd(*mnist_train_args(cache, one, "--batch-size", "128")), env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_proc(torchrun(2, *mnist_train_args(cache, two, "--batch-size", "64")), env)
    assert res.returncode == 0, res.stderr[-3000:]
    acc1, acc2 = final_accuracy(one), final_accuracy(two)
    print(f"MNIST-1D final test accuracy: 1 process {acc1:.4f}, 2 DDP ranks {acc2:.4f}")
    assert min(acc1, acc2) > 0.75, (acc1, acc2)

    args = torchrun(2, *mnist_train_args(cache, resumed, "--batch-size", "64"))
    stopped = run_proc(args, {**env, "KDCACHE_FAULT": "checkpoint.saved:5:TERM"}, timeout=600)
    assert stopped.returncode != 0 and not (resumed / "summary.json").exists()
    assert (resumed / "checkpoint-5.pt").exists() and not (resumed / "checkpoint-6.pt").exists()
    res = run_proc(args, env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert metrics_without_timing(resumed) == metrics_without_timing(two)
    assert final_accuracy(resumed) == acc2


def test_causal_lm_under_torchrun_matches_one_process_and_trains(tmp_path):
    """A sampled causal-lm store written by two ranks is byte-identical to one process's (the
    draws are seeded per row), and a student trains from it on two ranks."""
    lm = [
        "precompute", "--task", "causal-lm", "--teacher", "tests.toy_models:ToyCausalLM",
        "--data", "tests.toy_models:ToyTokens", "--data-arg", "n=40", "--shard-rows", "8",
        "--batch-size", "4", "--device", "cpu", *THREADS, "--quiet",
    ]  # fmt: skip
    two = run_proc(torchrun(2, *lm, "--out", tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    one = run_proc(kdcache_cmd(*lm, "--out", tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    assert files_under(tmp_path / "two") == files_under(tmp_path / "one")
    train = [
        "train", "--cache", tmp_path / "two", "--student", "tests.toy_models:ToyCausalLM",
        "--student-arg", "seed=2", "--data", "tests.toy_models:ToyTokens", "--data-arg", "n=40",
        "--eval-data", "tests.toy_models:ToyTokens", "--eval-data-arg", "n=8",
        "--eval-data-arg", "seed=4", "--epochs", "2", "--batch-size", "4",
        "--out", tmp_path / "student", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    res = run_proc(torchrun(2, *train))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    assert summary["epochs"] == 2
    rows = (tmp_path / "student" / "metrics.csv").read_text().splitlines()
    i, j = (rows[0].split(",").index(k) for k in ("loss", "eval_loss"))
    loss = [float(r.split(",")[i]) for r in rows[1:]]
    eval_loss = [float(r.split(",")[j]) for r in rows[1:]]
    assert loss[1] < loss[0] and eval_loss[1] < eval_loss[0], (loss, eval_loss)  # it learns
