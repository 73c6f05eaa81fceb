"""Stage one against the bare teacher: wall time and peak memory, each run its own process.

The teacher is `bench.stage_one_models.HeadLM` (hidden 512, a V-wide head, logits scaled to a mean
entropy of about 2 nats), the data `bench.lm_models:Blocks` (random blocks of 256 tokens). Each
contender runs in a fresh Python process so that its peak RSS is its own:

- `bare`: build the teacher, then `teacher(input_ids)` over the same batches precompute runs;
- `sampled`: `kdcache precompute --task causal-lm --codec sampled --samples 50`;
- `topk`: the same with `--codec topk --top-k 128`.

Rounds are interleaved (bare, sampled, topk, bare, ...) and each contender's best round is
compared with the bare loop's best. Targets: time <= 1.05x, peak RSS <= 1.3x (CPU);
on CUDA (`--device cuda`) time <= 1.05x and `torch.cuda.max_memory_allocated` <= 1.1x, in fp32
and in bf16 autocast (`--precision bf16`, or `--precision both`, the default there).

    python -m bench.bench_stage_one                       # CPU, V = 32,768 and 131,072
    python -m bench.bench_stage_one --device cuda         # one GPU, under 5 minutes
    python -m bench.bench_stage_one --vocab 32768 --rows 16 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEACHER, DATA = "bench.stage_one_models:HeadLM", "bench.lm_models:Blocks"
CONTENDERS = {"bare": {}, "sampled": {"samples": 50}, "topk": {"top_k": 128}}
# rows (blocks of LENGTH tokens) per vocabulary, per device: the CPU sizes take a few minutes on
# two cores; the CUDA sizes are 16k tokens per batch, as a real 8B teacher's batch on an H100.
LENGTH = 256
PLAN = {
    "cpu": {"rows": {32768: 32, 131072: 16}, "batch": 8},
    "cuda": {"rows": {32768: 512, 131072: 256}, "batch": 64},
}


def child(args) -> dict:
    """One contender in this process; prints what it measured as one JSON line."""
    import numpy as np
    import torch

    from bench.lm_models import Blocks
    from bench.stage_one_models import HeadLM
    from kdcache.pipeline.jobs import precompute
    from kdcache.stages.precompute.run import PrecomputeConfig

    cuda = args.device.startswith("cuda")
    # Timed from here, in both: building the teacher, the run; not the imports (whole-process
    # wall time is printed beside for that).
    t = time.perf_counter()
    if args.child == "bare":
        teacher = HeadLM(args.vocab, args.hidden, args.scale).eval().to(args.device)
        ds = Blocks(args.rows, LENGTH, args.vocab)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        with torch.inference_mode():
            for a in range(0, args.rows, args.batch):
                x = ds.get_batch(np.arange(a, min(args.rows, a + args.batch)))["input_ids"]
                x = torch.from_numpy(x).to(args.device, non_blocking=True)
                with torch.autocast(args.device.split(":")[0], dtype, enabled=dtype is not None):
                    teacher(x)
        if cuda:
            torch.cuda.synchronize()
    else:
        cfg = PrecomputeConfig(
            data=DATA, data_args={"n": args.rows, "length": LENGTH, "vocab": args.vocab},
            teacher=TEACHER, teacher_args={"vocab_size": args.vocab, "hidden": args.hidden,
                                           "scale": args.scale},
            out=str(Path(args.out) / args.child), task="causal-lm", codec=args.child,
            codec_options=CONTENDERS[args.child], batch_size=args.batch, device=args.device,
            precision=args.precision, quiet=True, random_teacher=True, force=True,
        )  # fmt: skip
        assert precompute(cfg)["status"] == "done"
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds,
        "tokens": args.rows * LENGTH,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def run_child(args, name: str, vocab: int, rows: int, scale: float, precision: str, out: str):
    cmd = [sys.executable, "-m", "bench.bench_stage_one", "--child", name, "--vocab", str(vocab),
           "--rows", str(rows), "--batch", str(args.batch), "--hidden", str(args.hidden),
           "--scale", repr(scale), "--device", args.device, "--precision", precision,
           "--out", out]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(args, vocab: int, precision: str, work: str) -> list[str]:
    import torch

    from bench.lm_models import Blocks, entropy
    from bench.stage_one_models import HeadLM, calibrate_scale

    rows = args.rows or PLAN[args.device.split(":")[0]]["rows"][vocab]
    probe = torch.from_numpy(Blocks(1, LENGTH, vocab).ids)
    scale = calibrate_scale(vocab, args.hidden, args.entropy, probe)
    with torch.inference_mode():
        ent = float(entropy(HeadLM(vocab, args.hidden, scale)(probe)).mean())
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in CONTENDERS:
            got = run_child(args, name, vocab, rows, scale, precision, work)
            if name not in best or got["seconds"] < best[name]["seconds"]:
                best[name] = got
    bare = best["bare"]
    mem = "cuda_mb" if args.device.startswith("cuda") else "rss_mb"
    head = (f"V = {vocab:,}, {rows} blocks of {LENGTH} tokens, batch {args.batch} rows, hidden "
            f"{args.hidden}, entropy {ent:.2f} nats, {args.device} {precision}, best of "
            f"{args.rounds}")  # fmt: skip
    lines = [head, "| run | s | tokens/s | time vs bare | peak MB | memory vs bare |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, got in best.items():
        label = "bare teacher(input_ids)" if name == "bare" else f"precompute {name} " + (
            f"N={CONTENDERS[name]['samples']}" if name == "sampled" else f"k={CONTENDERS[name]['top_k']}"
        )  # fmt: skip
        lines.append(
            f"| {label} | {got['seconds']:.2f} | {got['tokens'] / got['seconds']:,.0f} | "
            f"{got['seconds'] / bare['seconds']:.2f}x | {got[mem]:,.0f} | "
            f"{got[mem] / bare[mem]:.2f}x |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--rows", type=int, default=None, help="blocks per run (default: per device)")
    p.add_argument("--batch", type=int, default=None, help="rows per teacher batch")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--entropy", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", default=None, help="fp32, bf16, or both (default: fp32 on "
                   "CPU, both on CUDA)")  # fmt: skip
    p.add_argument("--workdir", default=None)
    p.add_argument("--child", choices=tuple(CONTENDERS), help=argparse.SUPPRESS)
    p.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    kind = args.device.split(":")[0]
    args.batch = args.batch or PLAN[kind]["batch"]
    if args.child:
        args.rows, args.vocab = args.rows, args.vocab[0]
        print(json.dumps(child(args)))
        return
    precisions = {"both": ["fp32", "bf16"]}.get(args.precision, [args.precision])
    if args.precision is None:
        precisions = ["fp32", "bf16"] if kind == "cuda" else ["fp32"]
    work = args.workdir or tempfile.mkdtemp(prefix="kdcache-bench-stage-one-")
    for vocab in args.vocab:
        for precision in precisions:
            print("\n".join(table(args, vocab, precision, work)) + "\n", flush=True)


if __name__ == "__main__":
    main()
