"""The LM students grouped by seed: the runs NAME-seed0, NAME-seed1, ... of one student (as
`kdcache train --seeds` names them) become one group with the mean and spread of their scores.

A run without a seed suffix is a group of one. A group's scores are means over its runs; its
`eval_loss_std` is the sample standard deviation (ddof = 1; None for one run). Differences
between two groups are of their means, and where both have runs of the same seeds, also per
seed (`paired`), since seed K of two students shares its data order and initial weights.
"""

from __future__ import annotations

import math
import re

SEED = re.compile(r"^(?P<base>.+)-seed(?P<seed>\d+)$")
# What a group says of its runs, taken from its first run: they differ only in seed.
SHARED = ("role", "taught", "cache", "codec", "codec_label", "short_label", "bytes_per_token",
          "disk_bytes_per_token", "store_bytes", "online_teacher", "epochs", "model", "spec",
          "num_params", "trainer", "agreement_on")  # fmt: skip


def file_bytes(e: dict) -> float | None:
    """A cache's bytes per token on disk (its Parquet files over its stored tokens), what a
    user pays; the payload (values at their widths) for a store written before it was kept."""
    return e.get("disk_bytes_per_token") or e.get("bytes_per_token")


def split_name(name: str) -> tuple[str, int | None]:
    m = SEED.match(name)
    return (m["base"], int(m["seed"])) if m else (name, None)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _std(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def group(students: list[dict]) -> list[dict]:
    """The groups, in the order their first runs appear."""
    by_base: dict[str, list[dict]] = {}
    for e in students:
        by_base.setdefault(split_name(e["name"])[0], []).append(e)
    out = []
    for base, runs in by_base.items():
        runs = sorted(runs, key=lambda e: (split_name(e["name"])[1] is None, e["name"]))
        scored = [e for e in runs if e["eval_loss"] is not None]
        losses = [e["eval_loss"] for e in scored]
        agree = [e["agreement"] for e in runs if e.get("agreement") is not None]
        secs = [e["train_seconds"] for e in runs if e.get("train_seconds") is not None]
        mean = _mean(losses)
        out.append(
            {k: runs[0].get(k) for k in SHARED}
            | {
                "name": base,
                "runs": [e["name"] for e in runs],
                "seeds": [split_name(e["name"])[1] for e in runs],
                "per_seed": {split_name(e["name"])[1]: e["eval_loss"] for e in scored},
                "n": len(losses),
                "eval_loss": mean,
                "eval_loss_std": _std(losses),
                "eval_losses": losses,
                "eval_perplexity": None if mean is None else math.exp(mean),
                "agreement": _mean(agree),
                "agreement_std": _std(agree),
                "train_seconds": _mean(secs),
                "teacher_seconds": _mean(
                    [e["teacher_seconds"] for e in runs if e.get("teacher_seconds") is not None]
                ),
            }
        )
    return out


def paired(a: dict | None, b: dict | None) -> dict | None:
    """a's loss minus b's, seed by seed, over the seeds both have (None: no common seed)."""
    if a is None or b is None:
        return None
    common = sorted(k for k in a["per_seed"] if k is not None and k in b["per_seed"])
    if not common:
        return None
    diffs = [a["per_seed"][k] - b["per_seed"][k] for k in common]
    return {"seeds": common, "diffs": diffs, "mean": _mean(diffs), "std": _std(diffs)}
