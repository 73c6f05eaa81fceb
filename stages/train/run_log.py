"""A run's log: the per-epoch rows as metrics.csv, the line logged per epoch, and the totals a
run's summary keeps (final and best epochs, rates). Each task adds its own columns
(`Task.row_fields`) and says which epoch is best (`Task.best`)."""

from __future__ import annotations

import csv
import io

from kdcache.stages import tasks
from kdcache.stages.common.fmt import num

BASE_FIELDS = (
    "epoch",
    "step",
    "lr",
    "loss",
    "hard_loss",
    "soft_loss",
    "feature_loss",
    "eval_loss",
    "eval_accuracy",
    "eval_ece",
    "agreement",
    "epoch_seconds",
    "samples_per_sec",
    "eval_perplexity",
    "tokens_per_sec",
    "relation_loss",
)
#: The columns of metrics.csv: the base ones, then every task's own (empty where not measured).
CSV_FIELDS = BASE_FIELDS + tuple(
    dict.fromkeys(f for t in tasks.every() for f in t.row_fields if f not in BASE_FIELDS)
)


def epoch_line(row: dict, epochs: int, task=None) -> str:
    """One epoch's log line: its losses, the task's measurements (`Task.scores`), its time."""
    task = tasks.get(task) if task is None or isinstance(task, str) else task
    losses = (
        f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f} (hard {row['hard_loss']:.4f} "
        f"soft {row['soft_loss']:.4f} feature {row['feature_loss']:.4f}"
        + (f" relation {row['relation_loss']:.4f})" if row.get("relation_loss") else ")")
    )
    took = f"{row['epoch_seconds']:.1f}s"
    if task.per_token:
        took += f", {num(row.get('tokens_per_sec'), '.0f')} tokens/s"
    return f"{losses} {task.scores(row)} [{took}]"


def _rate(rows: list[dict], key: str, seconds: float) -> float | None:
    done = sum(r[key] * r["epoch_seconds"] for r in rows if r.get(key))
    return done / seconds if seconds else None


def run_totals(rows: list[dict], task=None) -> dict:
    """final and best epochs, train seconds and samples/s of a run's rows. The best epoch is the
    task's (`Task.best`: the highest eval_accuracy, the lowest eval_loss of a causal-lm run, the
    lowest eval_mse of a regression run)."""
    task = tasks.get(task) if task is None or isinstance(task, str) else task
    keys = ("epoch", "eval_accuracy", "eval_ece", "agreement", "eval_loss", *task.row_fields)
    metric, sign = task.best
    final = {k: rows[-1].get(k) for k in keys}
    scored = [r for r in rows if r.get(metric) is not None]
    top = max(scored, key=lambda r: sign * r[metric]) if scored else rows[-1]
    best = {k: top.get(k) for k in keys}
    seconds = sum(r["epoch_seconds"] for r in rows)
    totals = {
        "train_seconds": seconds,
        "samples_per_sec": _rate(rows, "samples_per_sec", seconds),
        "final": final,
        "best": best,
        "test_accuracy": final["eval_accuracy"],
    }
    if task.per_token:
        totals["tokens_per_sec"] = _rate(rows, "tokens_per_sec", seconds)
    return totals


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _cell(row.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def _cell(v):
    if v is None:
        return ""
    return f"{v:.10g}" if isinstance(v, float) else v


def parse_csv(text: str) -> list[dict]:
    """Rows of a metrics.csv back as numbers (empty cells -> None)."""
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row = {}
        for k, v in raw.items():
            if v in ("", None):
                row[k] = None
            elif k in ("epoch", "step"):
                row[k] = int(v)
            else:
                row[k] = float(v)
        rows.append(row)
    return rows
