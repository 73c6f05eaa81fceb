"""The job report: the teacher and every student side by side, the cache, and what it saved.

`run` reads finished `kdcache train` folders (RUNS/teacher and RUNS/students/*: summary.json and
metrics.csv, on any fsspec URL) plus the store the students trained from, and writes report.md,
report.json and two PNGs beside `out`. The models and data sets it needs for agreement come from
`build`, which the pipeline supplies: `build.student(folder_url)` and `build.dataset(spec, args)`.
When the language-model job's runs exist (`--lm`, default RUNS/lm), the same files gain its section
(stages/report/lm.py: report.json's `lm`, two more PNGs); either job alone makes a report.

Accuracy is each run's *final* epoch on its --eval-data, not its best epoch:
picking the best epoch on the test set would flatter every model. Teacher agreement is recomputed
here on that same eval data (student top-1 == teacher top-1), because the trainer's own figure is
measured on the first cached rows, most of which are the teacher's training rows.

The baseline is a student trained on hard labels only (alpha = 0, beta = 0); `gain_points` compares
it with the best distilled student of the same architecture (same spec and kwargs), so the only
difference between the two is the loss.

Teacher time saved, counting the n students whose loss reads the cache (alpha > 0 or beta > 0),
with t the teacher's forward seconds recorded by `kdcache precompute`:
  one pass each: (n - 1) * t   each student would have run the teacher once over the data itself
  online KD:     (E - 1) * t   E = those students' epochs summed (a teacher forward every epoch)
A cache of V views paid V forwards per sample: online KD is then (E / V - 1) * t.
"""

from __future__ import annotations

import json
import logging
import os
import time

from kdcache.stages import tasks
from kdcache.stages.report import sections
from kdcache.stages.report.config import ReportConfig
from kdcache.stages.report.deploy import PLOT as DEPLOY_PLOT
from kdcache.stages.report.deploy import collect_deploy
from kdcache.stages.report.runs import (
    agreements,
    load_run,
    load_runs,
    memo_build,
    model_fields,
    open_cache,
)
from kdcache.stages.report.views import collect_views
from kdcache.stages.train import relations
from kdcache.stages.train.run_folder import RunFolder
from kdcache.storage.errors import UsageError
from kdcache.storage.fsio import open_location

log = logging.getLogger("kdcache.report")
PLOTS = ("accuracy_curves.png", "accuracy_bars.png")


#: The table of the classifier job's students: the runs of tasks that report them here.
CLASSIFIER_TABLE = "students"

# Students trained on hard labels, the data's or the teacher's top-1 (--pseudo-labels): baselines.
BASELINES = ("hard labels", "pseudo-labels")


def _kind(s: dict) -> str:
    st = s.get("settings", {})
    if not s.get("cache") or (
        st.get("alpha", 0) == 0 and st.get("beta", 0) == 0 and not st.get("relation")
    ):
        return "pseudo-labels" if s.get("cache") and st.get("pseudo_labels") else "hard labels"
    kind = "KD + features" if st.get("beta", 0) > 0 else "KD"
    return kind + " + relations" if st.get("relation") else kind


def _entry(s: dict, role: str) -> dict:
    st, best = s.get("settings", {}), s.get("best", {})
    kind = _kind(s)
    distilled = role == "student" and kind not in BASELINES
    return {
        "name": s["name"] if role == "student" else "teacher",
        "role": role,
        "kind": kind,
        **model_fields(s),
        "test_accuracy": s.get("test_accuracy"),
        "augment": st.get("augment"),
        "best_accuracy": best.get("eval_accuracy"),
        "best_epoch": best.get("epoch"),
        "eval_ece": s.get("final", {}).get("eval_ece"),
        "temperature": st.get("temperature") if distilled else None,
        "alpha": st.get("alpha") if distilled else None,
        "beta": st.get("beta") if distilled else None,
        "relation": relations.describe(st) if distilled else None,
        "epochs": s.get("epochs"),
        "train_seconds": s.get("train_seconds"),
        "wall_seconds": s.get("wall_seconds"),
        "samples_per_sec": s.get("samples_per_sec"),
        "cache": s.get("cache"),
        "cache_fingerprint": s.get("cache_fingerprint"),
        "eval_data": [st.get("eval_data"), st.get("eval_data_args") or {}],
        "curve": [
            [r["epoch"], r["eval_accuracy"]] for r in s["_rows"] if r["eval_accuracy"] is not None
        ],
        "folder": s["_folder"],
    }


def _cache_info(url: str, students: list[dict]) -> dict:
    users = [e for e in students if e["cache"] == url and e["kind"] != "hard labels"]
    info, r = open_cache(url, users)
    if r is None:
        return info
    stats = r.manifest.get("stats", {})
    t = stats.get("teacher_seconds")
    n, e_sum = len(users), sum(e["epochs"] or 0 for e in users)
    v = r.views["count"] if r.views else 1  # forwards per sample the cache paid for
    info.update(
        rows=r.num_rows,
        shards=len(r.shards),
        codec=r.codec.name,
        soft_labels=r.codec.label(),
        codec_error=r.codec.error_text(stats),
        **r.codec.describe(stats),
        num_classes=r.num_classes,
        temperature=r.temperature,
        logit_dtype=r.soft["dtype"],
        features=r.features_info,
        views=r.views,
        total_bytes=stats.get("total_bytes"),
        bytes_per_sample=stats.get("bytes_per_sample"),
        teacher_accuracy=stats.get("teacher_accuracy"),
        teacher_seconds=t,
        precompute_wall_seconds=stats.get("wall_seconds"),
        fingerprint=r.fingerprint,
        stale_students=[e["name"] for e in users if e["cache_fingerprint"] != r.fingerprint],
        time_saved=None
        if t is None or not n
        else {
            "teacher_seconds": t,
            "students": n,
            "epochs": e_sum,
            "one_pass_each_seconds": (n - 1) * t,
            "views": v,
            "online_seconds": (e_sum / v - 1) * t,
            "formula": "one pass each: (n - 1) * t; online KD: (E / V - 1) * t",
        },
    )
    return info


def _headline(report: dict) -> dict:
    students, by_name = report["students"], {e["name"]: e for e in report["students"]}
    hard = [e for e in students if e["kind"] == "hard labels" and e["test_accuracy"] is not None]
    distilled = [
        e for e in students if e["kind"] not in BASELINES and e["test_accuracy"] is not None
    ]
    same = lambda a, b: (a["spec"], a["model_args"]) == (b["spec"], b["model_args"])  # noqa: E731
    # Prefer a baseline that has distilled siblings of its own architecture to compare with.
    hard.sort(key=lambda b: not any(same(b, d) for d in distilled))
    base = hard[0] if hard else None
    rivals = [d for d in distilled if base is not None and same(base, d)]
    best = max(rivals, key=lambda e: e["test_accuracy"]) if rivals else None
    scored = [e for e in students if e["test_accuracy"] is not None]
    top = max(scored, key=lambda e: e["test_accuracy"]) if scored else None
    for e in students:
        e["gain_points"] = (
            None
            if base is None or e["test_accuracy"] is None
            else round(100 * (e["test_accuracy"] - base["test_accuracy"]), 4)
        )
    pseudo = [
        e
        for e in students
        if e["kind"] == "pseudo-labels"
        and e["test_accuracy"] is not None
        and best
        and same(e, best)
    ]
    pl = max(pseudo, key=lambda e: e["test_accuracy"]) if pseudo else None
    return {
        "pseudo_baseline": pl and pl["name"],
        "pseudo_accuracy": pl and pl["test_accuracy"],
        "gain_over_pseudo_points": (
            round(100 * (best["test_accuracy"] - pl["test_accuracy"]), 4) if pl else None
        ),
        "baseline": base and base["name"],
        "baseline_accuracy": base and base["test_accuracy"],
        "best_student": best and best["name"],
        "best_ties": [
            e["name"]
            for e in rivals
            if e is not best and e["test_accuracy"] == best["test_accuracy"]
        ],
        "best_accuracy": best and best["test_accuracy"],
        "gain_points": by_name[best["name"]]["gain_points"] if best else None,
        "best_overall": top and top["name"],
    }


def collect(cfg: ReportConfig, build) -> dict:
    """The report as a dict (what report.json holds)."""
    cfg = cfg.resolved()
    finished, unfinished = load_runs(cfg.students)
    by_table: dict[str, list] = {}
    for run in finished:  # each run in the table its task reports it in (Task.report_table)
        by_table.setdefault(tasks.get(run.get("settings", {}).get("task")).report_table, []).append(
            run
        )
    finished = by_table.pop(CLASSIFIER_TABLE, [])
    parts = {s.key: s.collect(cfg, build, by_table.get(s.key, [])) for s in sections.every()}
    parts = {k: v for k, v in parts.items() if v is not None}
    build = memo_build(build)  # agreement and the deployment figures load the same models
    if not finished and not any(p.get("students") for p in parts.values()):
        lm_folder = "lm" in parts
        raise UsageError(
            f"--students {cfg.students}: no finished student (no */summary.json"
            + (f", nor in {cfg.lm}/students" if lm_folder else "")
            + "); "
            "train the students first (`kdcache train --config ... --out FOLDER`, or rerun its "
            "command to finish)"
        )
    students = [_entry(s, "student") for s in finished]
    # Without classifier students (the LM job alone) the classifier's teacher is not reported.
    teacher_run = load_run(RunFolder(cfg.teacher)) if finished else None
    teacher = _entry(teacher_run, "teacher") if teacher_run else None
    if teacher and cfg.agreement:
        agreements(teacher, students, build)
    caches = sorted({e["cache"] for e in students if e["cache"]})
    report = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": cfg.runs,
        "teacher": teacher,
        "students": students,
        "unfinished": unfinished,
        "caches": [_cache_info(url, students) for url in caches],
    }
    report.update(_headline(report))
    report["views"] = collect_views(report)
    if students and cfg.agreement and cfg.deploy:
        report["deploy"] = collect_deploy(report, build)
    return report | parts


def run(cfg: ReportConfig, build) -> dict:
    """Collect the report and write report.md, report.json and (with plots) the PNGs."""
    from kdcache.stages.report.text import markdown

    cfg = cfg.resolved()
    report = collect(cfg, build)
    parent, _, name = cfg.out.rpartition("/")
    # Atomic writes: a reader (or a cron job running alongside) never sees a half-written file.
    loc = open_location(parent or ".")
    where = lambda n: f"{parent}/{n}" if parent else n  # noqa: E731 - the user's own spelling
    written = []
    if cfg.plots:
        try:
            from kdcache.stages.report import plots as rp
        except ImportError as exc:
            log.warning("no plots: %s (pip install 'kdcache[report]' for matplotlib)", exc)
        else:
            jobs = [(report, PLOTS, (rp.plot_curves, rp.plot_bars))] if report["students"] else []
            if "lm" in report:
                jobs.append(
                    (report["lm"], rp.LM_PLOTS, (rp.plot_lm_loss_vs_bytes, rp.plot_lm_curves))
                )
            if "deploy" in report:
                from kdcache.stages.report.deploy import plot_accuracy_vs_latency as plot

                jobs.append((report["deploy"], (DEPLOY_PLOT,), (plot,)))
            for part, names, plots in jobs:
                for png, plot in zip(names, plots, strict=True):
                    loc.write_bytes(plot(part), png)
                    written.append(png)
    # Each section lists its own plots: report.md shows the LM ones in the LM section.
    report["plots"] = [p for p in written if p in PLOTS]
    if "deploy" in report:
        report["deploy"]["plots"] = [p for p in written if p == DEPLOY_PLOT]
    if "lm" in report:
        report["lm"]["plots"] = [p for p in written if p not in (*PLOTS, DEPLOY_PLOT)]
    json_name = os.path.splitext(name)[0] + ".json"
    loc.write_bytes((json.dumps(report, indent=2) + "\n").encode(), json_name)
    loc.write_bytes(markdown(report).encode(), name)
    report["written"] = [where(name), where(json_name), *map(where, written)]
    return report
