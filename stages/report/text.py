"""report.md (and the table `kdcache report` prints) from the dict `kdcache.stages.report.run.collect` builds."""

from __future__ import annotations

from kdcache.stages.common.fmt import nbytes, num, pct, seconds
from kdcache.stages.report import sections


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
            num(e["temperature"]),
            num(e["alpha"]),
            num(e["beta"]),
            num(e["num_params"], ","),
            pct(e["test_accuracy"]),
            vs,
            pct(e["agreement"]),
            num(e["eval_ece"], ".3f"),
            num(e["epochs"]),
            seconds(e["train_seconds"]),
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
            f"Best distilled {best['model']}: **{best['name']}** at {pct(best['test_accuracy'])} "
            f"against {pct(base['test_accuracy'])} for the same model on hard labels only "
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
                f"rows ({pl['name']}, {pct(pl['test_accuracy'])}): "
                f"**{report['gain_over_pseudo_points']:+.1f} points**."
            )
    elif report.get("baseline"):
        parts.append(
            f"No distilled student shares the baseline {report['baseline']}'s architecture."
        )
    if t:
        parts.append(f"The teacher ({t['model']}) scores {pct(t['test_accuracy'])}.")
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
        f"- size {nbytes(c['total_bytes'])}, {num(c['bytes_per_sample'], '.0f')} bytes/"
        + ("view" if c.get("views") else "sample"),
        f"- teacher accuracy on the cache's labeled rows {pct(c['teacher_accuracy'])}"
        + (f"; {c['codec_error']}" if c.get("codec_error") else ""),
        f"- teacher forward t = {seconds(c['teacher_seconds'])} (precompute wall "
        f"{seconds(c['precompute_wall_seconds'])}), paid once",
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
            f"= {seconds(ts['one_pass_each_seconds'])}",
            "- online distillation, a teacher forward every epoch: "
            + (
                f"(E / V - 1) * t with V = {ts['views']} views, "
                if ts.get("views", 1) > 1
                else "(E - 1) * t with "
            )
            + f"E = {e} epochs in all = {seconds(ts['online_seconds'])}",
        ]
    return lines + [""]


def markdown(report: dict) -> str:
    lines = [
        "# kdcache report",
        "",
        f"Runs in `{report['runs']}`, generated {report['generated']}.",
    ]
    lines += [""] + _classifier(report) if report["students"] else [""]
    for section in sections.every():
        if section.key in report:
            lines += section.markdown(report[section.key])
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
