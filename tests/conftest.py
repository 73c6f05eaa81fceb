"""Shared fixtures: toy stage-one runs in-process, through click, and as real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests import toy_models

REPO = Path(__file__).resolve().parents[1]
# The conditions every stage-one run of the suite holds, in this process or a child, whatever
# OMP_NUM_THREADS the suite runs under: one CPU thread, fp32, the helpers' batch plan. A store's
# bytes are promised identical across reruns and resumes only under equal conditions
# (stages/precompute/conditions.py), so byte-identity tests must hold them fixed, not inherit them.
THREADS = ("--threads", "1")
TEACHER = "tests.toy_models:ToyNet"
DATA = "tests.toy_models:ToyData"


def toy_config(out, **overrides):
    """A small, fast PrecomputeConfig over ToyNet/ToyData; any field can be overridden."""
    from kdcache.stages.precompute.config import PrecomputeConfig

    fields = dict(
        teacher=TEACHER,
        data=DATA,
        out=str(out),
        data_args={"n": 50},
        shard_rows=16,
        batch_size=8,
        quiet=True,
        device="cpu",
        threads=1,
    )
    if "top_k" in overrides:  # the topk codec's option, as the --top-k flag would pass it
        fields["codec_options"] = {"top_k": overrides.pop("top_k")}
    fields.update(overrides)
    return PrecomputeConfig(**fields)


def toy_precompute(out, **overrides) -> dict:
    from kdcache.pipeline.jobs import precompute

    return precompute(toy_config(out, **overrides))


def teacher_outputs(n: int = 50, teacher_args: dict | None = None, data_args: dict | None = None):
    """What ToyNet computes on ToyData, in the test itself: (logits z, body activations, x)."""
    model = toy_models.ToyNet(**(teacher_args or {})).eval()
    x = torch.from_numpy(toy_models.toy_inputs(n, **(data_args or {})))
    with torch.no_grad():
        return model(x), model.body(x), x


def cli_args(out, *extra: str, n: int = 50) -> list[str]:
    return [
        "precompute",
        "--teacher",
        TEACHER,
        "--data",
        DATA,
        "--data-arg",
        f"n={n}",
        "--out",
        str(out),
        "--shard-rows",
        "16",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        *THREADS,
        "--quiet",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Runs in this process may set torch's thread count (`train --threads 1`): leave it as it
    was, so that no test's conditions depend on the tests before it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


STREAM_ROWS = 100


@pytest.fixture(scope="module")
def stream_store(tmp_path_factory):
    url = tmp_path_factory.mktemp("stream") / "store"
    # 7 shards of 16 rows (the last holds 4), labels missing on every 7th row, features stored.
    toy_precompute(
        url,
        data_args={"n": STREAM_ROWS, "every_missing": 7},
        features="body",
        dtype="float32",
        top_k=3,
    )
    return str(url)


def ids_of(stream, workers: int) -> list[np.ndarray]:
    """The sample ids of each batch a DataLoader with `workers` workers yields from `stream`."""
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [b["sample_id"].numpy() for b in loader]


@pytest.fixture
def memory_url():
    """A fresh memory:// store URL, removed afterwards (the memory filesystem is process-global)."""
    url = f"memory://kdcache-tests/{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    root = url[len("memory://") :]
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def cli():
    """Invoke `kdcache ...` in-process; returns click's Result (stdout, stderr, exit_code)."""
    from kdcache.pipeline.cli import main

    def invoke(*args: str, env: dict | None = None):
        return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)

    return invoke


def kdcache_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from kdcache.pipeline.cli import main; main()", *map(str, args)]


def wait_for(done, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll `done()` until it holds, failing if `proc` ends first or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while not done():
        if proc.poll() is not None:
            err = proc.communicate()[1] if proc.stderr else b""
            pytest.fail(f"the process ended before {what}: {(err or b'').decode()[-3000:]}")
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.01)


def kill_9_after_commits(args: list, out: Path, commits: int = 2) -> None:
    """Run `kdcache ARGS` writing the store `out`, SIGKILL it right after its `commits`-th commit
    marker (it sends the signal to itself there: kdcache.storage.faults, no polling race on a
    loaded machine), and check exactly those shards are committed and no manifest (unfinished)."""
    env = {**os.environ, "KDCACHE_FAULT": f"shard.marker:{commits}"}
    res = subprocess.run(kdcache_cmd(*args), cwd=REPO, env=env, capture_output=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert len(list((out / "_commits").glob("*.json"))) == commits
    assert not (out / "manifest.json").exists()


@pytest.fixture
def kdcache_proc():
    """Run `kdcache ...` as a real process from the repo root (for exit codes, locks, kill -9)."""

    def run(*args: str, env: dict | None = None, timeout: float = 120):
        return subprocess.run(
            kdcache_cmd(*args),
            cwd=REPO,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def assert_one_line_error(stderr: str, *needles: str) -> None:
    """A user error is one `kdcache: error:` line naming the problem, never a traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("kdcache: error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, stderr)


def files_under(root: Path) -> dict[str, bytes]:
    """Every data file of a store (not its bookkeeping JSON) by relative path -> bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel.startswith(("soft_labels/", "features.zarr/")):
            out[rel] = p.read_bytes()
    return out


def labels_of(n: int, every_missing: int = 0) -> np.ndarray:
    ds = toy_models.ToyData(n, every_missing=every_missing)
    return np.array([-1 if (y := ds.label(i)) is None else y for i in range(n)], np.int64)


LM_ROWS = 20
LM_SMALL = ["vocab_size=64", "n_layer=1", "n_head=2", "n_embd=16", "n_positions=32"]


def _lm_precompute(out, codec: str) -> str:
    from kdcache.pipeline.cli import main

    args = [
        "precompute", "--task", "causal-lm", "--teacher", "kdcache.pipeline.examples.lm:gpt2",
        *[a for p in LM_SMALL for a in ("--teacher-arg", p)], "--data",
        "tests.toy_models:ToyTokens", "--data-arg", f"n={LM_ROWS}", "--out", str(out), "--codec", codec, "--top-k", "4", "--shard-rows", "8",
        "--batch-size", "4", "--device", "cpu", "--threads", "1", "--quiet",
    ]  # fmt: skip
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    return str(out)


@pytest.fixture(scope="session")
def lm_stores(tmp_path_factory):
    """Sampled, topk and dense stores of a tiny random GPT-2 (V = 64) on ToyTokens(LM_ROWS): what the
    Python API's tests (issue 23) read."""
    root = tmp_path_factory.mktemp("lm_stores")
    return {c: _lm_precompute(root / c, c) for c in ("sampled", "topk", "dense")}
