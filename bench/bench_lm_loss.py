"""Stage two at language-model vocabularies: `kdcache train` from a cache against CE only, and
`kdcache evaluate`'s memory, each run as a whole process (its peak RSS from `wait4`).

1. train: a `CausalMix(dim 128)` student over `bench.lm_models:Blocks`, one epoch, from a
   `sampled` (N = 50) and a `topk` (k = 64) store of a ZipfLM teacher at V = 32,768 and 131,072,
   against the same `kdcache train` with no cache (next-token CE only: same data, batches, steps).
   Step time is the epoch's `epoch_seconds` (loader + forward + loss + backward + AdamW, no
   eval); targets: <= 1.05x the CE-only time, <= 1.2x its peak RSS. Where the student's output
   layer is fused into the loss (`--fused-head`, the default where available) the unfused run
   (`--no-fused-head`) is a row too.
2. evaluate: `kdcache evaluate` of that student on B blocks of 512 tokens at V = 131,072 (and
   32,768), B growing: peak RSS must stay flat (target: within 2 GB at the largest B).

    python -m bench.bench_lm_loss [--quick] [--json out.json]
    python -m bench.bench_lm_loss --device cuda      # the same on a GPU (see bench/lm_loss_cuda.py)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_lm import store, teacher_stats
from bench.common import Report, median, parse_args, ratio

STUDENT, DATA = "bench.lm_models:CausalMix", "bench.lm_models:Blocks"
DIM, SAMPLES, TOPK = 128, 50, 64
# block length, blocks, batch rows, vocabularies; eval block length and block counts
SIZES = {
    "full": (128, 16, 4, (32768, 131072), 512, (2, 8, 32)),
    "quick": (128, 8, 4, (32768,), 512, (2, 4)),
    "tiny": (16, 4, 2, (2048,), 32, (2, 4)),
}


def run(args: list[str]) -> tuple[float, int, str]:
    """`kdcache ...` through a tiny wrapper that writes its own peak RSS (ru_maxrss) on exit."""
    with tempfile.NamedTemporaryFile(suffix=".rss", delete=False) as f:
        rss = f.name
    code = (
        "import atexit, resource, sys\n"
        f"atexit.register(lambda: open({rss!r}, 'w').write("
        "str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))\n"
        "from kdcache.pipeline.cli import main\n"
        "sys.argv = ['kdcache', *sys.argv[1:]]\n"
        "main()\n"
    )
    cmd = [sys.executable, "-c", code, *map(str, args)]
    tick = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if proc.returncode:
        raise RuntimeError(f"kdcache {' '.join(map(str, args))} failed: {proc.stderr[-2000:]}")
    peak = int(Path(rss).read_text())
    os.unlink(rss)
    return wall, peak, proc.stdout


def has_flag(flag: str) -> bool:
    return flag in run(["train", "--help"])[2]


def train_args(work: Path, v: int, length: int, blocks: int, batch: int, device: str) -> list:
    return [
        "train", "--student", STUDENT, "--student-arg", f"vocab_size={v}", "--student-arg",
        f"dim={DIM}", "--data", DATA, "--data-arg", f"n={blocks}", "--data-arg",
        f"length={length}", "--data-arg", f"vocab={v}", "--epochs", "1", "--batch-size", batch,
        "--device", device, "--threads", os.environ.get("BENCH_THREADS", "2"),
    ]  # fmt: skip


def epoch_seconds(out: Path) -> float:
    return float(json.loads((out / "summary.json").read_text())["train_seconds"])


def train_table(report: Report, work: Path, sizes, repeat: int, device: str) -> Path | None:
    length, blocks, batch, vocabs, _, _ = sizes
    fused = has_flag("--fused-head")
    t = report.table(
        f"kdcache train, one epoch of {blocks} blocks x {length} tokens, batch {batch} rows, "
        f"CausalMix(dim {DIM}), device {device}: KD from a cache vs next-token CE only "
        "(epoch seconds and peak RSS of the whole process; best of the repeats)",
        ["V", "run", "epoch s (best)", "epoch s (median)", "vs CE (best)", "peak RSS MB",
         "RSS vs CE"],
    )  # fmt: skip
    last = None
    for v in vocabs:
        exponent, _ = teacher_stats(v, length)
        stores = {
            f"sampled N={SAMPLES}": store(work, f"s{v}", v, blocks, length, exponent, "sampled",
                                          samples=SAMPLES),
            f"topk k={TOPK}": store(work, f"k{v}", v, blocks, length, exponent, "topk",
                                    top_k=TOPK),
        }  # fmt: skip
        base = train_args(work, v, length, blocks, batch, device)
        runs = {"next-token CE only": [*base, "--task", "causal-lm"]}
        for name, r in stores.items():
            runs[f"KD from {name}"] = [*base, "--cache", r.url]
            if fused:
                runs[f"KD from {name}, --no-fused-head"] = [*base, "--cache", r.url,
                                                           "--no-fused-head"]  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in runs}
        peaks: dict[str, list[int]] = {k: [] for k in runs}
        for i in range(repeat):  # interleaved: machine noise hits every run alike
            for name, args in runs.items():
                out = work / f"run-{v}-{i}-{len(times[name])}-{abs(hash(name))}"
                _, peak, _ = run([*args, "--out", out])
                times[name].append(epoch_seconds(out))
                peaks[name].append(peak)
                if "CE only" in name:
                    last = out  # a trained student for the evaluate table
                else:
                    shutil.rmtree(out, ignore_errors=True)
        ce_t, ce_m = min(times["next-token CE only"]), min(peaks["next-token CE only"])
        for name in runs:
            best, peak = min(times[name]), min(peaks[name])
            t.add(v, name, best, median(times[name]), ratio(best, ce_t), peak / 2**20,
                  ratio(peak, ce_m))  # fmt: skip
            if name.startswith("KD") and "--no-fused" not in name:
                report.target(f"train step {name} / CE only at V={v:,}", ratio(best, ce_t), "<=",
                              1.05)  # fmt: skip
                report.target(f"train peak RSS {name} / CE only at V={v:,}", ratio(peak, ce_m),
                              "<=", 1.2)  # fmt: skip
    return last


def eval_table(report: Report, work: Path, sizes, model: Path | None, device: str) -> None:
    _, _, _, vocabs, length, counts = sizes
    v = vocabs[-1]
    t = report.table(
        f"kdcache evaluate of a CausalMix(dim {DIM}) at V = {v:,} on B blocks of {length} "
        "tokens: peak RSS of the process",
        ["blocks", "tokens", "fp32 logits of all rows MB", "peak RSS MB", "seconds"],
    )
    if model is None:
        return
    peak = 0
    # The code before issue 22 built every eval row's logits at once (and float64 copies): its
    # "before" numbers were taken with BENCH_EVAL_MAX_BLOCKS capping B so as not to OOM the box.
    cap = int(os.environ.get("BENCH_EVAL_MAX_BLOCKS", "0")) or max(counts)
    measured = [c for c in counts if c <= cap]
    for b in measured:
        args = ["evaluate", "--checkpoint", model, "--data", DATA, "--data-arg", f"n={b}",
                "--data-arg", f"length={length}", "--data-arg", f"vocab={v}", "--device",
                device, "--json"]  # fmt: skip
        wall, peak, _ = run(args)
        t.add(b, b * length, b * length * v * 4 / 2**20, peak / 2**20, wall)
    report.target(f"evaluate peak RSS at {measured[-1]} blocks x {length}, V={v:,} (GB)",
                  peak / 2**30, "<=", 2.0)  # fmt: skip


def main(argv: list[str] | None = None) -> Report:
    argv = list(sys.argv[1:] if argv is None else argv)
    device = "cpu"
    if "--device" in argv:
        i = argv.index("--device")
        device = argv[i + 1]
        del argv[i : i + 2]
    if device != "cpu":
        from bench import lm_loss_cuda

        return lm_loss_cuda.main(argv, device)
    args = parse_args(__doc__.splitlines()[0], argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    repeat = args.repeat or (1 if args.quick else 2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdcache-bench-lm-loss-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report("stage two at LM vocabularies: KD train vs CE only, evaluate memory",
                    quick=args.quick)  # fmt: skip
    model = train_table(report, work, SIZES[mode], repeat, device)
    eval_table(report, work, SIZES[mode], model, device)
    return report.finish(args, work)


if __name__ == "__main__":
    main()
