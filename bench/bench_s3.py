"""Streaming a store from a local S3 endpoint against the local filesystem, same store, same reader.

The same synthetic store (top-k k=8 soft labels + 256-d float16 features, written with the
stage-one writer, see `bench.bench_reader`) is written twice: to a local folder and to
`s3://kdcache-bench/store` on a moto S3 server this script starts on 127.0.0.1 (`moto[server]`,
a separate process). `kdcache.storage.stream.CacheStream` then reads one epoch of each through
`DataLoader(batch_size=None, num_workers=0)`, interleaved, for every prefetch depth, in two
settings:

- read only: batches are consumed and dropped; this is the raw samples/s of each backend.
- GPU-like step: each batch waits 2 ms with the CPU idle (`time.sleep`), as a loop waiting on a
  GPU does; the situation the prefetch thread is made for: whole shards are fetched ahead while
  the step runs, so object-store latency should hide behind it.
- CPU step: each batch trains a small MLP (256 -> 512 -> 100 on the features, forward + backward
  + AdamW) on the CPU, competing with the S3 client and the server for the same cores.

torch runs with one thread, leaving the second core to the prefetch thread and the server. moto
serves from Python on the same 2 cores as the reader, so its numbers are a pessimistic loopback
stand-in for a real object store's bandwidth, and an optimistic one for its latency.

    python bench/bench_s3.py [--quick] [--json out.json]     (or python -m bench.bench_s3)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/bench_s3.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.bench_reader import BATCH, CLASSES, DIM, synthetic_columns, write_store  # noqa: E402
from bench.common import Report, environment, interleaved, median, parse_args, ratio  # noqa: E402
from kdcache.storage.stream import CacheStream  # noqa: E402

SIZES = {"full": (100_000, 16384), "quick": (20_000, 4096), "tiny": (3_000, 1024)}
BUCKET = "kdcache-bench"
AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            return proc, endpoint
        except urllib.error.HTTPError:
            return proc, endpoint
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(
        f"bench_s3: moto server did not start on {endpoint} (pip install 'moto[server]')"
    )


class Sleep:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def step(self, batch: dict) -> None:
        time.sleep(self.seconds)


class Student:
    """A training step on each batch's features: the work prefetching should overlap with."""

    def __init__(self):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(DIM, 512), nn.ReLU(), nn.Linear(512, CLASSES))
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3)

    def step(self, batch: dict) -> None:
        z = self.net(batch["features"].float())
        loss = nn.functional.cross_entropy(z, batch["topk_indices"][:, 0].long())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def epoch_fn(url: str, prefetch: int, rows: int, student: Student | None):
    stream = CacheStream(url, batch_size=BATCH, shuffle=True, seed=0, prefetch=prefetch)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)

    def run() -> None:
        n = 0
        for batch in loader:
            if student is not None:
                student.step(batch)
            n += len(batch["sample_id"])
        assert n == rows, f"{url}: {n} rows, expected {rows}"

    return run


def first_batch_fn(url: str):
    """Time to the first batch: the shuffle buffer fills (about `buffer_size` rows) before it."""
    stream = CacheStream(url, batch_size=BATCH, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)
    return lambda: next(iter(loader))


def main(argv: list[str] | None = None) -> Report:
    args = parse_args(__doc__.splitlines()[0], argv)
    threads, saved_env = torch.get_num_threads(), dict(os.environ)
    torch.set_num_threads(1)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    rows, shard_rows = SIZES[mode]
    repeat = args.repeat or (1 if args.quick else 3)
    depths = (1, 2) if args.quick else (1, 2, 4)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdcache-bench-s3-"))
    shutil.rmtree(work / "store", ignore_errors=True)
    proc, endpoint = start_moto()
    os.environ.update(AWS, AWS_ENDPOINT_URL=endpoint)
    try:
        import fsspec

        fsspec.filesystem("s3").mkdir(BUCKET)
        cols = synthetic_columns(rows)
        local, s3 = str(work / "store"), f"s3://{BUCKET}/store"
        t_write = {}
        for name, url in (("local", local), ("s3", s3)):
            t = time.perf_counter()
            write_store(url, cols, shard_rows)
            t_write[name] = time.perf_counter() - t
        size = sum(p.stat().st_size for p in (work / "store").rglob("*") if p.is_file())

        report = Report("streaming reader: local S3 endpoint vs local filesystem", quick=args.quick)
        settings = (
            ("read only", None),
            ("GPU-like step (2 ms idle CPU per batch)", Sleep(0.002)),
            ("CPU step (MLP fwd+bwd+AdamW per batch)", Student()),
        )
        for title, student in settings:
            table = report.table(
                f"CacheStream epoch, {title}: {rows:,} rows in {-(-rows // shard_rows)} shards "
                f"of {shard_rows}, batch {BATCH}, {size / 1e6:.1f} MB",
                [
                    "prefetch",
                    "local samples/s",
                    "s3 samples/s",
                    "s3 / local",
                    "runs local; s3 (s)",
                ],
            )
            for depth in depths:
                times = interleaved(
                    {
                        "local": epoch_fn(local, depth, rows, student),
                        "s3": epoch_fn(s3, depth, rows, student),
                    },
                    repeat=repeat,
                    warmup=1,
                )
                t_local, t_s3 = median(times["local"]), median(times["s3"])
                runs = "; ".join(" ".join(f"{s:.2f}" for s in times[k]) for k in ("local", "s3"))
                table.add(depth, rows / t_local, rows / t_s3, ratio(t_local, t_s3), runs)
                if isinstance(student, Sleep) and depth == 2:
                    # The default depth, with the CPU free: what prefetching is meant to deliver.
                    goal = "s3 / local samples/s, GPU-like step, prefetch 2"
                    report.target(goal, ratio(t_local, t_s3), ">=", 0.8)
        first = interleaved(
            {"local": first_batch_fn(local), "s3": first_batch_fn(s3)}, repeat=repeat, warmup=1
        )
        report.note(
            f"time to the first batch (shuffle buffer filled, default 16384 rows): local "
            f"{median(first['local']):.3f} s, s3 {median(first['s3']):.3f} s: no prefetch hides "
            "it, and with an idle-CPU step it is most of what separates s3 from local above"
        )
        report.note(
            f"writing the store: local {t_write['local']:.2f} s, s3 {t_write['s3']:.2f} s "
            f"(stage-one writer, {size / 1e6:.1f} MB)"
        )
        report.note(f"S3 endpoint: moto server at {endpoint} (loopback, same machine)")
        report.note(f"environment: {environment()}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(saved_env)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report.emit(args.json)
    return report


if __name__ == "__main__":
    main()
