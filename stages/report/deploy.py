"""The report's deployment section: what the teacher and each student cost to run on a CPU.

For every model with eval data: parameters, bytes of its saved weights, CPU latency at batch 1
and 256 and samples/s (stages/evaluate/deploy.py), beside its test accuracy; each student also as its int8
copy (Linear layers dynamically quantized), whose accuracy is measured here on the same eval data.
One plot: test accuracy against batch-1 latency (log scale), int8 copies marked.
"""

from __future__ import annotations

import torch

from kdcache.stages.common.fmt import ms, pct
from kdcache.stages.evaluate import deploy

PLOT = "accuracy_vs_latency.png"


def collect_deploy(report: dict, build) -> dict:
    """report.json's `deploy`: the timing settings and one row per model and precision.
    `build` should be report_runs.memo_build's, so that models agreement loaded are reused."""
    rows = []
    for e in ([report["teacher"]] if report.get("teacher") else []) + report["students"]:
        spec, args = e["eval_data"]
        if not spec:
            continue
        data = build.dataset(spec, args)
        f = deploy.figures(build.student(e["folder"]), data, int8=e["role"] == "student")
        base = {"name": e["name"], "role": e["role"], "kind": e["kind"], "model": e["model"]}
        rows.append(base | _figures(f) | {"precision": "float32", "accuracy": e["test_accuracy"]})
        if "int8" in f:
            rows.append(base | _figures(f["int8"]) | {"precision": "int8"})
    return {
        "threads": torch.get_num_threads(),
        "warmup": deploy.WARMUP,
        "repeats": deploy.REPEATS,
        "budget_seconds": deploy.BUDGET,
        "quantization": deploy.QUANTIZATION,
        "models": rows,
    }


def _figures(f: dict) -> dict:
    keys = ("params", "weight_bytes", "latency_b1", "latency_b256", "samples_per_sec", "accuracy")
    return {k: f[k] for k in keys if k in f}


def deploy_markdown(d: dict, plots: list[str]) -> list[str]:
    """The section's lines: what was timed and how, the table, the plot."""
    lines = [
        "## What each model costs to run (CPU)",
        "",
        f"Latency is the median of up to {d['repeats']} timed forwards after {d['warmup']} "
        f"warm-up ones (at most {d['budget_seconds']:g} s per model and batch size), on "
        f"{d['threads']} CPU thread(s), in eval mode without gradients; samples/s at batch 256. "
        f"Weights = bytes of the saved state dict. int8 = {d['quantization']}: the students' "
        "Linear weights stored as int8, activations quantized per batch; its accuracy is "
        "measured on the same test data.",
        "",
        "| model | precision | params | weights | test accuracy | latency, batch 1 "
        "| latency, batch 256 | samples/s |",
        "|" + "---|" * 8,
    ]
    for r in d["models"]:
        cells = [
            r["name"],
            r["precision"],
            f"{r['params']:,}",
            f"{r['weight_bytes'] / 1024:.1f} KiB",
            pct(r.get("accuracy")),
            ms(r["latency_b1"]),
            ms(r["latency_b256"]),
            f"{r['samples_per_sec']:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if PLOT in plots:
        lines += [f"![test accuracy against batch-1 latency]({PLOT})", ""]
    return lines


def plot_accuracy_vs_latency(d: dict) -> bytes:
    """Test accuracy against batch-1 latency (log x), one point per model in its own colour,
    named in the legend (students of one architecture take the same time, so labels beside the
    points would overprint); each int8 copy a hollow diamond joined to its float model."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from kdcache.stages.report.plots import TEACHER, _png

    fig = Figure(figsize=(10, 5))
    ax = fig.add_subplot()
    rows = [r for r in d["models"] if r.get("accuracy") is not None]
    floats = [r for r in rows if r["precision"] == "float32"]
    palette = _cycle()
    colors = {}
    for r in floats:
        colors[r["name"]] = TEACHER if r["role"] == "teacher" else palette[len(colors) % 9]
        x, y = 1e3 * r["latency_b1"], 100 * r["accuracy"]
        ax.scatter(x, y, s=50, color=colors[r["name"]], zorder=3,
                   label=f"{r['name']} ({r['kind']}): {y:.1f}%")  # fmt: skip
    for r in rows:
        if r["precision"] != "int8" or r["name"] not in colors:
            continue
        f, color = next(f for f in floats if f["name"] == r["name"]), colors[r["name"]]
        x, y = 1e3 * r["latency_b1"], 100 * r["accuracy"]
        ax.scatter(x, y, s=60, marker="D", facecolors="none", edgecolors=color, zorder=3)
        ax.plot([1e3 * f["latency_b1"], x], [100 * f["accuracy"], y], color=color, lw=0.8)
    ax.scatter([], [], s=60, marker="D", facecolors="none", edgecolors="#444444",
               label="hollow: its int8 copy")  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    # Minor ticks labelled at 2, 3 and 5 x 10^n only: all of them would overlap.
    some = lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""  # noqa: E731
    ax.xaxis.set_minor_formatter(FuncFormatter(some))
    ax.set_xlabel(f"latency at batch 1, ms (log scale; CPU, {d['threads']} thread(s))")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("What each model costs to run: test accuracy against batch-1 latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _cycle() -> list:
    """tab10 without its red, which marks the teacher."""
    from matplotlib import colormaps

    return [colormaps["tab10"](i) for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)]
