"""A real S3 endpoint on 127.0.0.1 (moto's server mode) and helpers to run kdcache against it.

The server is a separate process (`python -m moto.server`) on a free port, so that torchrun
workers, killed subprocesses and the test process all talk to one endpoint over loopback, and a
busy test process never stalls it. Credentials and the endpoint reach every client through the
standard AWS variables (`AWS_ENDPOINT_URL` included), set for this process and inherited by
subprocesses.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from tests.conftest import DATA, REPO, TEACHER

BUCKET = "kdcache-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(endpoint: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is serving
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer on {endpoint} within {timeout:.0f}s")


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start moto's S3 server, point the AWS variables at it, create BUCKET; yield the endpoint."""
    s3fs = pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mp = pytest.MonkeyPatch()
    try:
        _wait_until_up(endpoint, proc)
        for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(key, value)
        # Each conftest that imports this fixture starts its own server: a cached S3FileSystem
        # would still point at an earlier session's (stopped) endpoint.
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
        yield endpoint
    finally:
        mp.undo()
        s3fs.S3FileSystem.clear_instance_cache()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_url(s3_endpoint) -> str:
    """A fresh, empty prefix in the test bucket for one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3fs_fresh(s3_endpoint):
    """An S3 filesystem with no listing cache, to see exactly what the server holds."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def s3_objects(fs, url: str, prefixes: tuple[str, ...] = ("soft_labels/", "features.zarr/")):
    """Data objects of a store on S3 (not its bookkeeping JSON): relative key -> bytes."""
    root = url.removeprefix("s3://").rstrip("/")
    out = {}
    for key in sorted(fs.find(root)):
        rel = key[len(root) + 1 :]
        if rel.startswith(prefixes):
            out[rel] = fs.cat_file(key)
    return out


def subprocess_env(**extra: str) -> dict:
    """Environment for a kdcache subprocess: the repo importable, one thread (bitwise equality)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_proc(cmd: list[str], env: dict | None = None, timeout: float = 180):
    return subprocess.run(
        cmd, cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def torchrun(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc-per-node N --no-python kdcache ...` from this venv."""
    kdcache = os.path.join(os.path.dirname(sys.executable), "kdcache")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--no-python",
        kdcache,
        *map(str, args),
    ]


def toy_train_args(cache, out, n: int, *extra: str) -> list[str]:
    """`kdcache train` of the toy student (the toy teacher's class, another seed) on n rows."""
    return [
        "train", "--cache", str(cache), "--student", TEACHER, "--student-arg", "seed=5",
        "--data", DATA, "--data-arg", f"n={n}", "--eval-data", DATA, "--eval-data-arg", f"n={n}",
        "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip
