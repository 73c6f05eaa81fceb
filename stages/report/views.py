"""The report's augmentation section: students trained with `--augment`, on soft labels of the
very view they see (a cache of views, replayed) or of the plain input (the naive pairing), beside
the same student without augmentation, with what each cache cost.

"The same student" is the same model spec and arguments, T, alpha, beta and relation loss. Bytes
per view are also given for the soft labels alone (keys, label, codec columns and the input hash),
since a plain cache may also hold features its students do not read.
"""

from __future__ import annotations

from kdcache.stages.common.fmt import nbytes, num, pct, seconds

TWINS = ("spec", "model_args", "temperature", "alpha", "beta", "relation")


def _twin(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in TWINS)


def _soft_bytes(cache: dict) -> float | None:
    per_row, f = cache.get("bytes_per_sample"), cache.get("features")
    if per_row is None or not f:
        return per_row
    return per_row - f["dim"] * (2 if f["dtype"] == "float16" else 4)


def _pairing(e: dict, cache: dict) -> str:
    if not e.get("augment"):
        return "none"
    return "replayed" if cache.get("views") else "naive"


def collect_views(report: dict) -> dict | None:
    """Rows of the augmentation table (None when no student trained with --augment)."""
    augmented = [e for e in report["students"] if e.get("augment")]
    if not augmented:
        return None
    caches = {c["url"]: c for c in report.get("caches", [])}
    rows = []
    for e in report["students"]:
        if not (e.get("augment") or any(_twin(e, a) for a in augmented)):
            continue
        c = caches.get(e["cache"], {})
        views = c.get("views")
        rows.append(
            {
                "name": e["name"],
                "pairing": _pairing(e, c),
                "augment": e.get("augment"),
                "test_accuracy": e["test_accuracy"],
                "cache": e["cache"],
                "views": views["count"] if views else (1 if e["cache"] else None),
                "cache_bytes": c.get("total_bytes"),
                "bytes_per_view": c.get("bytes_per_sample"),
                "soft_bytes_per_view": _soft_bytes(c),
                "teacher_seconds": c.get("teacher_seconds"),
            }
        )
    best = {}
    for r in rows:
        if r["test_accuracy"] is not None:
            old = best.get(r["pairing"])
            if old is None or r["test_accuracy"] > old["test_accuracy"]:
                best[r["pairing"]] = r
    return {"rows": rows, "best": {k: v["name"] for k, v in best.items()}}


_WHAT = {
    "replayed": "the same view (replayed)",
    "naive": "the plain input (naive)",
    "none": "the plain input",
}


def views_markdown(views: dict | None) -> list[str]:
    if not views:
        return []
    lines = [
        "## Augmentation: soft labels of the view the student sees",
        "",
        "| student | augmentation | soft labels of | test accuracy | views/sample | cache size "
        "| bytes/view | soft-label bytes/view | teacher time paid |",
        "|" + "---|" * 9,
    ]
    for r in views["rows"]:
        spec = r["augment"].rsplit(":", 1)[-1] if r["augment"] else "none"
        cells = [
            r["name"],
            spec,
            _WHAT[r["pairing"]],
            pct(r["test_accuracy"]),
            num(r["views"]),
            nbytes(r["cache_bytes"]),
            num(r["bytes_per_view"], ".0f"),
            num(r["soft_bytes_per_view"], ".0f"),
            seconds(r["teacher_seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    by_name = {r["name"]: r for r in views["rows"]}
    best = {k: by_name[v] for k, v in views["best"].items()}
    lines.append("")
    if "replayed" in best:
        rep = best["replayed"]
        parts = [f"{rep['name']} (replayed views) {pct(rep['test_accuracy'])}"]
        for other in ("naive", "none"):
            if other in best:
                o = best[other]
                gain = 100 * (rep["test_accuracy"] - o["test_accuracy"])
                label = "naive" if other == "naive" else "no augmentation"
                parts.append(f"{gain:+.1f} pts vs {o['name']} ({label}, {pct(o['test_accuracy'])})")
        lines += ["; ".join(parts) + ".", ""]
    lines += [
        "Teacher time paid is the cache's teacher forward time (`kdcache precompute`), paid once "
        "for all of its students; bytes/view are per stored row (a cache of V views stores V "
        "rows per sample), soft-label bytes leave out stored features.",
        "",
    ]
    return lines
