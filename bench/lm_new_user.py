"""Issue 22's new-user run, end to end through the CLI, with each process's peak RSS.

A Llama-style teacher saved with `save_pretrained` (V = 8,192), a `sampled` store of 2,000 blocks
of 128 tokens, a 64-wide 1-layer Llama student from a config, `kdcache train --epochs 1
--batch-size 32` with 100 eval blocks (the agreement set: the store's first 5,000 rows, here all
2,000 blocks). Before issue 22 the train process was OOM-killed at 22.7 GB on a 24 GB machine.

    python -m bench.lm_new_user [--blocks 2000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.bench_lm_loss import run

V = 8192


def save_llama(folder: Path, hidden: int, layers: int, heads: int, seed: int) -> None:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=2000)
    p.add_argument("--workdir")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdcache-new-user-"))
    save_llama(work / "teacher", 128, 2, 4, 0)
    save_llama(work / "student", 64, 1, 2, 1)
    spec = "kdcache.pipeline.examples.lm:from_folder"
    data = ["--data", "bench.lm_models:Blocks", "--data-arg", f"n={args.blocks}", "--data-arg",
            "length=128", "--data-arg", f"vocab={V}"]  # fmt: skip
    wall, peak, _ = run(["precompute", "--task", "causal-lm", "--teacher", spec, "--teacher-arg",
                         f"path={work / 'teacher'}", "--random-teacher", *data, "--codec",
                         "sampled", "--batch-size", "32", "--out", work / "store", "--device",
                         "cpu", "--quiet"])  # fmt: skip
    print(f"precompute: {wall:.0f} s, peak RSS {peak / 2**30:.2f} GB")
    wall, peak, _ = run(["train", "--cache", work / "store", "--student", spec, "--student-arg",
                         f"path={work / 'student'}", *data, "--eval-data",
                         "bench.lm_models:Blocks", "--eval-data-arg", "n=100", "--eval-data-arg",
                         "length=128", "--eval-data-arg", f"vocab={V}", "--eval-data-arg",
                         "seed=1", "--epochs", "1", "--batch-size", "32", "--out",
                         work / "student-run", "--device", "cpu", "--quiet"])  # fmt: skip
    print(f"train: {wall:.0f} s, peak RSS {peak / 2**30:.2f} GB")


if __name__ == "__main__":
    main()
