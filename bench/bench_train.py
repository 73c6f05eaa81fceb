"""Stage two epoch time: a student from the cache vs hard labels only vs the teacher online.

All three train the same `StudentMLP` with AdamW and the trainer's warmup + cosine schedule on the
same rows, batch 256, CPU. The data set is MNIST-1D train + transfer with the generator's labels
kept on every row (`LabeledMNIST1D` below), so the hard-label run steps over exactly as many rows
as the cached one and the comparison is per equal epoch; the cached run's loss also has its hard
term on every row.

- cache: `kdcache.pipeline.jobs.train` with `--cache` (top-k k=8 soft labels, alpha 0.9, beta 0); also shown,
  not targeted, with beta 0.5 on the stored teacher features through a learned projector.
- hard labels: `kdcache.pipeline.jobs.train` without `--cache` (cross-entropy only).
- teacher online: the loop written out below with a `TeacherCNN` forward (no_grad) every step and
  the same loss as the cached run, top-k k=8 of the live logits through `soft_loss_topk`.

The teacher has random weights (timing does not depend on what it learnt). Epoch times are the
trainer's own `epoch_seconds` (the loop only; evaluation and checkpoints are outside); the first
epoch of each run is dropped as warm-up when there are more. Targets: cache / hard <= 1.10;
online / cache is printed and should be large.

    python -m bench.bench_train [--quick] [--json out.json]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import Report, median, parse_args, ratio
from kdcache.pipeline.examples.mnist1d import (
    TRAIN_SEED,
    TRANSFER_SEED,
    default_cache_dir,
    load_or_generate,
)
from kdcache.pipeline.examples.models import StudentMLP, TeacherCNN
from kdcache.pipeline.jobs import precompute, train
from kdcache.stages.precompute.run import PrecomputeConfig
from kdcache.stages.train import loss as losses
from kdcache.stages.train.streams import JoinedStream, LabelStream
from kdcache.stages.train.trainer import TrainConfig, schedule
from kdcache.storage.codecs.topk import soft_loss_topk

DATA = "bench.bench_train:LabeledMNIST1D"
STUDENT = "kdcache.pipeline.examples.models:StudentMLP"
TEACHER = "kdcache.pipeline.examples.models:TeacherCNN"
# (transfer rows, epochs per run, repetitions) per mode.
SIZES = {"full": (30000, 5, 2), "quick": (4000, 2, 1), "tiny": (600, 1, 1)}
BATCH, LR, WD, WARMUP, ALPHA, T, K = 256, 1e-3, 0.01, 0.05, 0.9, 4.0, 8


class LabeledMNIST1D(torch.utils.data.Dataset):
    """MNIST-1D train + transfer rows with every label kept (the example hides transfer labels)."""

    def __init__(self, num_transfer: int = 30000, cache_dir: str | None = None):
        root = default_cache_dir(cache_dir)
        std = load_or_generate(TRAIN_SEED, 5000, 0.8, root)
        fresh = load_or_generate(TRANSFER_SEED, -(-num_transfer // 10) * 10, 1.0, root)
        self.x = np.concatenate([std["x"], fresh["x"][:num_transfer]]).astype(np.float32)
        self.y = np.concatenate([std["y"], fresh["y"][:num_transfer]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.x[i]), int(self.y[i])

    def get_batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {"input": self.x[ids], "label": self.y[ids]}


def trainer_epochs(work: Path, name: str, epochs: int, **kw) -> list[float]:
    out = work / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(
        student=STUDENT, data=DATA, data_args=kw.pop("data_args"), out=str(out), epochs=epochs,
        batch_size=BATCH, lr=LR, weight_decay=WD, warmup=WARMUP, alpha=ALPHA, device="cpu",
        quiet=True, agree_rows=1000, **kw,
    )  # fmt: skip
    result = train(cfg)
    shutil.rmtree(out, ignore_errors=True)
    return [row["epoch_seconds"] for row in result["rows"]]


def online_epochs(data_args: dict, epochs: int, seed: int = 0) -> list[float]:
    """The student trained with the teacher in the loop: what the cache saves."""
    data = LabeledMNIST1D(**data_args)
    torch.manual_seed(seed)
    teacher = TeacherCNN().eval()
    student = StudentMLP().train()
    stream = LabelStream(data, BATCH, seed=seed)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(epochs * len(stream), WARMUP))
    seconds = []
    for epoch in range(1, epochs + 1):
        stream.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)
        tick = time.perf_counter()
        for batch in loader:
            x, y = batch["input"], batch["label"]
            with torch.no_grad():
                s = teacher(x) / T  # what precompute would have stored
                vals, idx = torch.topk(s, K, dim=1)
                lse = torch.logsumexp(s, dim=1)
            z = student(x)
            soft = soft_loss_topk(z, idx, vals, lse, T, T)
            loss = ALPHA * soft + (1 - ALPHA) * losses.hard_loss(z, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        seconds.append(time.perf_counter() - tick)
    return seconds


def loader_epochs(stream, epochs: int) -> list[float]:
    """Seconds per epoch of only iterating a stream (no model): the data side of an epoch."""
    seconds = []
    for epoch in range(1, epochs + 1):
        stream.set_epoch(epoch)
        tick = time.perf_counter()
        for _ in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0):
            pass
        seconds.append(time.perf_counter() - tick)
    return seconds


def step_costs(steps: int, seed: int = 0) -> dict[str, float]:
    """ms per optimizer step on one fixed in-memory batch: the compute side, no loader at all."""
    torch.manual_seed(seed)
    student = StudentMLP().train()
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WD)
    x, y = torch.randn(BATCH, 40), torch.randint(0, 10, (BATCH,))
    s = torch.randn(BATCH, 10)
    vals, idx = torch.topk(s, K, dim=1)
    vals, idx, lse = vals.half(), idx.int(), torch.logsumexp(s, dim=1)

    def step(kd: bool) -> None:
        z = student(x)
        loss = losses.hard_loss(z, y)
        if kd:
            soft = soft_loss_topk(z, idx, vals, lse, T, T)
            loss = ALPHA * soft + (1 - ALPHA) * loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out: dict[str, list[float]] = {"hard": [], "kd": []}
    for _ in range(3):
        for name in out:
            for _ in range(10):
                step(name == "kd")
            tick = time.perf_counter()
            for _ in range(steps):
                step(name == "kd")
            out[name].append(1000 * (time.perf_counter() - tick) / steps)
    return {k: min(v) for k, v in out.items()}


def steady(epochs: list[float]) -> list[float]:
    return epochs[1:] if len(epochs) > 1 else epochs


def main(argv: list[str] | None = None) -> Report:
    args = parse_args(__doc__.splitlines()[0], argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    transfer, epochs, repeat = SIZES[mode]
    repeat = args.repeat or repeat
    data_args = {"num_transfer": transfer}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdcache-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = len(LabeledMNIST1D(**data_args))

    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    tick = time.perf_counter()
    precompute(
        PrecomputeConfig(
            data=DATA, data_args=data_args, teacher=TEACHER, out=str(cache), codec="topk",
            codec_options={"top_k": K}, temperature=T, features="features", device="cpu", quiet=True,
            random_teacher=True,  # timed, not taught from: untrained weights cost the same
        )
    )  # fmt: skip
    pre_seconds = time.perf_counter() - tick

    def trained(name: str, **kw):
        return lambda: trainer_epochs(work, name, epochs, data_args=data_args, **kw)

    def iterated(make):
        return lambda: loader_epochs(make(), epochs + 1)

    runs = {
        "hard labels only": trained("hard"),
        "from the cache (top-k, alpha 0.9)": trained("cache", cache=str(cache)),
        "from the cache + features (beta 0.5)": trained(
            "feat", cache=str(cache), beta=0.5, student_features="hidden"
        ),
        "teacher online (TeacherCNN forward per step)": lambda: online_epochs(data_args, epochs),
    }
    data = LabeledMNIST1D(**data_args)
    loaders = {
        "LabelStream (hard-label run's loader)": iterated(lambda: LabelStream(data, BATCH)),
        "CacheStream + input join (cached run's loader)": iterated(
            lambda: JoinedStream(str(cache), data, BATCH, features=False)
        ),
        "CacheStream + input join + features": iterated(
            lambda: JoinedStream(str(cache), data, BATCH, features=True)
        ),
    }
    per_epoch: dict[str, list[float]] = {}
    for _ in range(repeat):  # round-robin, so machine noise hits every contender alike
        for name, fn in (runs | loaders).items():
            per_epoch.setdefault(name, []).extend(steady(fn()))
    med = {k: median(v) for k, v in per_epoch.items()}
    hard, cached = med["hard labels only"], med["from the cache (top-k, alpha 0.9)"]
    online = med["teacher online (TeacherCNN forward per step)"]

    report = Report("student epoch: cache vs hard labels vs teacher online", quick=args.quick)
    t = report.table(
        f"StudentMLP, {rows:,} rows (MNIST-1D train+transfer, all labeled), batch {BATCH}, "
        f"{torch.get_num_threads()} torch threads, CPU",
        ["run", "epoch s (median)", "samples/s", "vs hard", "vs cache", "epochs timed"],
    )
    for name in runs:
        sec = med[name]
        t.add(name, sec, rows / sec, ratio(sec, hard), ratio(sec, cached), len(per_epoch[name]))
    lt = report.table(
        "the data side alone: one epoch of each loader, no model (same rows, batch, shuffle)",
        ["loader", "epoch s (median)", "samples/s", "share of the hard-label epoch"],
    )
    for name in loaders:
        sec = med[name]
        lt.add(name, sec, rows / sec, ratio(sec, hard))
    steps = step_costs(20 if args.quick else 200)
    st = report.table(
        "the compute side alone: ms per step on one in-memory batch (best of 3)",
        ["step", "ms/step", "vs hard"],
    )
    st.add("StudentMLP + cross-entropy + AdamW", steps["hard"], 1.0)
    st.add("StudentMLP + top-k KD loss + AdamW", steps["kd"], ratio(steps["kd"], steps["hard"]))
    report.target("cache / hard-label epoch", ratio(cached, hard), "<=", 1.10)
    report.note(f"online / cache epoch = {ratio(online, cached):.2f} (should be large)")
    report.note(
        f"cache made once by precompute in {pre_seconds:.1f} s (TeacherCNN, random weights, "
        "top-k 8 + 128-d features), not counted in the epochs"
    )
    return report.finish(args, work)


if __name__ == "__main__":
    main()
