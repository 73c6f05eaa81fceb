"""The report's PNGs (two for the classifier job, two for the language-model job), drawn with matplotlib's Agg canvas.

`Figure` + `FigureCanvasAgg` rather than pyplot: no global backend switch, no display needed, and
nothing leaks into a caller that uses pyplot itself.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from kdcache.stages.report.lm_groups import file_bytes

COLORS = {"hard labels": "#7f7f7f", "KD": "#1f77b4", "KD + features": "#2ca02c"}
COLORS |= {"pseudo-labels": "#8c564b", "KD + relations": "#ff7f0e"}
TEACHER = "#d62728"
LM_PLOTS = ("lm_loss_vs_bytes.png", "lm_loss_curves.png")
LM_LINES = {"teacher online": "#9467bd", "hard labels": "#7f7f7f"}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _label(e: dict) -> str:
    bits = [e["model"]]
    if e["temperature"] is not None:  # distilled (not a hard- or pseudo-label baseline)
        bits.append(f"T={e['temperature']:g}")
        if e["beta"]:
            bits.append(f"beta={e['beta']:g}")
    return f"{e['name']} ({', '.join(bits)})"


def plot_curves(report: dict) -> bytes:
    """Eval accuracy per epoch, one line per student; the teacher's final accuracy as a line."""
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    styles = ["-", "--", "-.", ":"]
    low = 100.0
    for i, e in enumerate(report["students"]):
        if not e["curve"]:
            continue
        x = [c[0] for c in e["curve"]]
        y = [100 * c[1] for c in e["curve"]]
        low = min(low, *y)
        base = e["name"] == report.get("baseline")
        ax.plot(
            x,
            y,
            styles[0] if base else styles[1 + i % 3],
            color=COLORS.get(e["kind"]) if base else None,
            linewidth=2.2 if base else 1.6,
            label=f"{_label(e)}: {y[-1]:.1f}%",
        )
    t = report.get("teacher")
    if t and t["test_accuracy"] is not None:
        acc = 100 * t["test_accuracy"]
        ax.axhline(acc, color=TEACHER, linestyle=":", linewidth=2, label=f"teacher: {acc:.1f}%")
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval accuracy (%)")
    ax.set_title("Students trained from one teacher cache: eval accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_bars(report: dict) -> bytes:
    """Final eval accuracy of every model, with the teacher and the baseline as reference lines."""
    rows = ([report["teacher"]] if report.get("teacher") else []) + report["students"]
    rows = [e for e in rows if e["test_accuracy"] is not None]
    fig = Figure(figsize=(max(7.0, 1.3 * len(rows) + 3.5), 5))
    ax = fig.add_subplot()
    acc = [100 * e["test_accuracy"] for e in rows]
    colors = [TEACHER if e["role"] == "teacher" else COLORS.get(e["kind"], "#9467bd") for e in rows]
    bars = ax.bar(range(len(rows)), acc, color=colors)
    for bar, value in zip(bars, acc, strict=True):
        ax.annotate(
            f"{value:.1f}%",
            (bar.get_x() + bar.get_width() / 2, value),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=9,
        )
    refs = [(report.get("teacher"), TEACHER, "teacher")]
    base = next((e for e in report["students"] if e["name"] == report.get("baseline")), None)
    refs.append((base, COLORS["hard labels"], "hard-label baseline"))
    for e, color, what in refs:
        if e and e["test_accuracy"] is not None:
            ax.axhline(
                100 * e["test_accuracy"], color=color, linestyle="--", linewidth=1, label=what
            )
    names = [
        "teacher\n" + e["model"] if e["role"] == "teacher" else f"{e['name']}\n{e['model']}"
        for e in rows
    ]
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    title = "Test accuracy: teacher, hard-label baseline and distilled students"
    if report.get("gain_points") is not None:
        title += f"\nbest distilled {report['best_student']}: {report['gain_points']:+.1f} points"
    ax.set_title(title, fontsize=11)
    handles = [
        _patch(c, k) for k, c in COLORS.items() if any(e["kind"] == k for e in report["students"])
    ]
    ax.legend(
        handles=ax.get_legend_handles_labels()[0] + handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
    )
    fig.tight_layout()
    return _png(fig)


def _patch(color: str, label: str):
    from matplotlib.patches import Patch

    return Patch(color=color, label=label)


def plot_lm_loss_vs_bytes(lm: dict) -> bytes:
    """Validation loss (the mean over a student's seeds) against the cache's bytes/token on disk,
    one point per cache student labelled with its codec; the online-KD and hard-label students
    (no cache to size) as horizontal lines."""
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    groups = lm.get("groups", lm["students"])
    points = [e for e in groups if file_bytes(e) and e["eval_loss"] is not None]
    ax.scatter([file_bytes(e) for e in points], [e["eval_loss"] for e in points], zorder=3)
    for e in points:
        ax.annotate(
            f"{e['name']}: {e['short_label']}",
            (file_bytes(e), e["eval_loss"]),
            xytext=(5, 4),
            textcoords="offset points",
            fontsize=8,
        )
    for e in groups:
        if e["taught"] in LM_LINES and e["eval_loss"] is not None:
            ax.axhline(
                e["eval_loss"],
                color=LM_LINES[e["taught"]],
                linestyle="--",
                label=f"{e['name']} ({e['taught']}): {e['eval_loss']:.3f}",
            )
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20, 40 rather than 2 x 10^1
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    if points:  # room for the labels right of the last point
        sizes = [file_bytes(e) for e in points]
        ax.set_xlim(min(sizes) / 1.5, max(sizes) * 3)
    ax.set_xlabel("cache bytes per token on disk (log scale)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Language-model students: validation loss against the cache's size")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_lm_curves(lm: dict) -> bytes:
    """Validation loss per epoch, one line per language-model student."""
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for i, e in enumerate(lm["students"]):
        if not e["curve"]:
            continue
        what = e["short_label"] if e["taught"] == "cache" else e["taught"]
        ax.plot(
            [c[0] for c in e["curve"]],
            [c[1] for c in e["curve"]],
            ["-", "--", "-.", ":"][i % 4],
            color=LM_LINES.get(e["taught"]),
            marker="o",
            markersize=3,
            label=f"{e['name']} ({what}): {e['curve'][-1][1]:.3f}",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Language-model students: validation loss per epoch")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _png(fig)
