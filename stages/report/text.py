"""report.md (and the table `kdcache report` prints) from the dict `kdcache.stages.report.run.collect` builds."""

from __future__ import annotations

from kdcache.stages.report import regression as report_regression


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v, fmt: str = "{:g}") -> str:
    return "-" if v is None else fmt.format(v)


def _seconds(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def _bytes(v) -> str:
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.2f} {unit}"
        v /= 1024
    return "-"


def table(report: dict) -> str:
    """The models table: teacher first, then every student in training order."""
    base = report.get("baseline")
    head = (
        "| model | architecture | loss | T | alpha | beta | params | test accuracy | vs baseline "
        "| agrees with teacher | ECE | epochs | train time |"
    )
    lines = [head, "|" + "---|" * 13]
    rows = ([report["teacher"]] if report.get("teacher") else []) + report["students"]
    for e in rows:
        loss = "hard labels (teacher)" if e["role"] == "teacher" else e["kind"]
        if e.get("relation"):  # which relation, at what weight
            loss = loss.replace("relations", e["relation"])
        if e["name"] == base:
            loss += " (baseline)"
        if e.get("augment"):
            loss += " + augmentation"
        gain = e.get("gain_points")
        vs = (
            "-"
            if gain is None or e["role"] == "teacher" or e["name"] == base
            else f"{gain:+.1f} pts"
        )
        cells = [
            f"**{e['name']}**" if e["name"] == report.get("best_student") else e["name"],
            e["model"],
            loss,
            _num(e["temperature"]),
            _num(e["alpha"]),
            _num(e["beta"]),
            _num(e["num_params"], "{:,}"),
            _pct(e["test_accuracy"]),
            vs,
            _pct(e["agreement"]),
            _num(e["eval_ece"], "{:.3f}"),
            _num(e["epochs"]),
            _seconds(e["train_seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(report: dict) -> str:
    by_name = {e["name"]: e for e in report["students"]}
    t = report.get("teacher")
    parts = []
    if report.get("best_student"):
        best, base = by_name[report["best_student"]], by_name[report["baseline"]]
        parts.append(
            f"Best distilled {best['model']}: **{best['name']}** at {_pct(best['test_accuracy'])} "
            f"against {_pct(base['test_accuracy'])} for the same model on hard labels only "
            f"({base['name']}): **{report['gain_points']:+.1f} points**"
            + (
                f" (tied with {', '.join(report['best_ties'])})."
                if report.get("best_ties")
                else "."
            )
        )
        if report.get("pseudo_baseline"):
            pl = by_name[report["pseudo_baseline"]]
            parts.append(
                f"Against the same model on the teacher's top-1 class as hard labels over the same "
                f"rows ({pl['name']}, {_pct(pl['test_accuracy'])}): "
                f"**{report['gain_over_pseudo_points']:+.1f} points**."
            )
    elif report.get("baseline"):
        parts.append(
            f"No distilled student shares the baseline {report['baseline']}'s architecture."
        )
    if t:
        parts.append(f"The teacher ({t['model']}) scores {_pct(t['test_accuracy'])}.")
    return " ".join(parts)


def _views(c: dict) -> str:
    v = c.get("views")
    if not v:
        return ""
    spec = v["augment"].rsplit(":", 1)[-1]
    return f" ({c['rows'] // v['count']:,} samples x {v['count']} views of `{spec}`)"


def _cache(c: dict) -> list[str]:
    lines = [f"### `{c['url']}`", ""]
    if "error" in c:
        return lines + [f"Could not open it: {c['error']}", ""]
    soft = c["soft_labels"]
    f = c.get("features")
    feats = (
        f" + {f['dim']}-d features of `{f['layer']}` ({f['pool']} pool, {f['dtype']})" if f else ""
    )
    lines += [
        f"- {c['rows']:,} rows{_views(c)} in {c['shards']} shards: {soft} at T = "
        f"{c['temperature']:g} "
        f"({c['logit_dtype']}){feats}",
        f"- size {_bytes(c['total_bytes'])}, {_num(c['bytes_per_sample'], '{:.0f}')} bytes/"
        + ("view" if c.get("views") else "sample"),
        f"- teacher accuracy on the cache's labeled rows {_pct(c['teacher_accuracy'])}"
        + (f"; {c['codec_error']}" if c.get("codec_error") else ""),
        f"- teacher forward t = {_seconds(c['teacher_seconds'])} (precompute wall "
        f"{_seconds(c['precompute_wall_seconds'])}), paid once",
    ]
    if c.get("stale_students"):
        lines.append(
            f"- warning: {', '.join(c['stale_students'])} trained on an earlier cache at this URL"
        )
    ts = c.get("time_saved")
    if ts:
        n, e, t = ts["students"], ts["epochs"], ts["teacher_seconds"]
        lines += [
            "",
            f"Teacher time saved for the n = {n} students that read it (t = {t:.2f} s):",
            "",
            f"- each student running the teacher once itself: (n - 1) * t = {n - 1} * {t:.2f} s "
            f"= {_seconds(ts['one_pass_each_seconds'])}",
            "- online distillation, a teacher forward every epoch: "
            + (
                f"(E / V - 1) * t with V = {ts['views']} views, "
                if ts.get("views", 1) > 1
                else "(E - 1) * t with "
            )
            + f"E = {e} epochs in all = {_seconds(ts['online_seconds'])}",
        ]
    return lines + [""]


def markdown(report: dict) -> str:
    from kdcache.stages.report.lm_text import lm_markdown

    lines = [
        "# kdcache report",
        "",
        f"Runs in `{report['runs']}`, generated {report['generated']}.",
    ]
    lines += [""] + _classifier(report) if report["students"] else [""]
    if "regression" in report:
        lines += report_regression.markdown(report["regression"])
    if "lm" in report:
        lines += lm_markdown(report["lm"])
    return "\n".join(lines)


def _classifier(report: dict) -> list[str]:
    from kdcache.stages.report.views import views_markdown

    lines = [
        headline(report),
        "",
        table(report),
        "",
        "Test accuracy and ECE (15 bins) are each model's final epoch on its eval data; "
        '"agrees with teacher" is the share of those samples where its top-1 class is the '
        "teacher's. T, alpha, beta: distillation temperature and the weights in "
        "`alpha * soft + (1 - alpha) * hard + beta * feature`, plus `gamma * relation` where the "
        "loss names a relation; pseudo-labels: cross-entropy on the teacher's top-1 class on "
        "every cached row, no soft term. Train time excludes evaluation.",
        "",
    ]
    if report.get("unfinished"):
        lines += [f"Unfinished (no summary.json yet): {', '.join(report['unfinished'])}.", ""]
    if report.get("caches"):
        lines += ["## The cache", ""]
        for c in report["caches"]:
            lines += _cache(c)
    lines += views_markdown(report.get("views"))
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in report["plots"]] + [""]
    if report.get("deploy"):
        from kdcache.stages.report.deploy import deploy_markdown

        lines += deploy_markdown(report["deploy"], report["deploy"].get("plots", []))
    return lines
