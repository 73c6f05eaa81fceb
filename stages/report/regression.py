"""The report's regression part: every regression run (those whose task reports them in this table) in one table.

A regression student is scored by its final epoch on its --eval-data: MSE, MAE and R² against the
true targets, and MSE / R² against the teacher's stored outputs on the first cached rows (what
`kdcache train` measured; the rows are the cache's, which are usually the teacher's own training
inputs). Its loss is named by alpha: 0 is the true targets alone, 1 the teacher alone, anything
between both (`alpha * MSE(teacher) + (1 - alpha) * MSE(targets)`, stages/tasks/regression.py).
"""

from __future__ import annotations

from kdcache.stages import tasks
from kdcache.stages.common.fmt import num
from kdcache.stages.report.runs import model_fields, open_cache
from kdcache.stages.report.sections import Section, register

#: The runs whose task reports them here (`Task.report_table`).
TABLE = "regression"


def _here(s: dict) -> bool:
    return tasks.get(s.get("settings", {}).get("task")).report_table == TABLE


def split(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the other runs, the regression runs), each in the given order."""
    return [s for s in runs if not _here(s)], [s for s in runs if _here(s)]


def loss_name(st: dict) -> str:
    alpha, beta = st.get("alpha"), st.get("beta") or 0
    name = (
        "targets only"
        if alpha == 0
        else "teacher only"
        if alpha == 1
        else f"teacher + targets (alpha {alpha:g})"
    )
    name += " + features" if beta > 0 else ""
    return name + (", normalised" if st.get("normalize_targets") else "")


def entry(s: dict) -> dict:
    st, final = s.get("settings", {}), s.get("final", {})
    fields = model_fields(s)
    return {
        "name": s["name"],
        "model": fields["model"],
        "num_params": fields["num_params"],
        "loss": loss_name(st),
        "alpha": st.get("alpha"),
        "beta": st.get("beta"),
        **{k: final.get(k) for k in ("eval_mse", "eval_mae", "eval_r2")},
        **{k: final.get(k) for k in ("teacher_mse", "teacher_r2")},
        "epochs": s.get("epochs"),
        "train_seconds": s.get("train_seconds"),
        "cache": s.get("cache"),
        "eval_data": [st.get("eval_data"), st.get("eval_data_args") or {}],
    }


def _cache(url: str, users: list[dict]) -> dict:
    info, r = open_cache(url, users)
    if r is not None:
        stats = r.manifest.get("stats", {})
        info.update(
            rows=r.num_rows,
            outputs=r.num_classes,
            target_rows=r.target_rows,
            **{k: stats.get(k) for k in ("target_mean", "target_std", "teacher_mse", "teacher_r2")},
        )
    return info


def collect(runs: list[dict]) -> dict:
    """report.json's `regression`: the entries, the best by eval MSE, and the caches they read."""
    entries = [entry(s) for s in runs]
    scored = [e for e in entries if e["eval_mse"] is not None]
    best = min(scored, key=lambda e: e["eval_mse"]) if scored else None
    urls = sorted({e["cache"] for e in entries if e["cache"]})
    caches = [_cache(u, [e for e in entries if e["cache"] == u]) for u in urls]
    return {"students": entries, "best": best and best["name"], "caches": caches}


def table(part: dict) -> str:
    head = "| model | architecture | loss | params | MSE | MAE | R² | vs teacher: MSE | vs teacher: R² | epochs | train time |"
    lines = [head, "|" + "---|" * 11]
    for e in part["students"]:
        name = f"**{e['name']}**" if e["name"] == part.get("best") else e["name"]
        cells = [
            name,
            e["model"],
            e["loss"],
            num(e["num_params"], ","),
            num(e["eval_mse"], ".4g"),
            num(e["eval_mae"], ".4g"),
            num(e["eval_r2"], ".3f"),
            num(e["teacher_mse"], ".4g"),
            num(e["teacher_r2"], ".3f"),
            num(e["epochs"], ""),
            "-" if e["train_seconds"] is None else f"{e['train_seconds']:.1f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(part: dict) -> list[str]:
    lines = ["## Regression students", "", table(part), ""]
    lines += [
        "MSE, MAE and R² (per output, averaged) are each student's final epoch on its eval data "
        "against the true targets; vs teacher: MSE and R² of the student against the teacher's "
        "stored outputs on the first cached rows. Loss: `alpha * MSE(student, teacher) + "
        "(1 - alpha) * MSE(student, targets)` over the rows with a target.",
        "",
    ]
    for c in part["caches"]:
        if "error" in c:
            lines += [f"- `{c['url']}`: could not open it: {c['error']}"]
            continue
        lines += [
            f"- `{c['url']}`: {c['rows']:,} rows, {c['target_rows']:,} with a target; the "
            f"teacher on them: MSE {num(c['teacher_mse'], '.4g')}, R² {num(c['teacher_r2'], '.3f')}"
        ]
    return lines + [""]


def _terminal(part: dict) -> tuple[str, str]:
    return table(part), f"Best regression student: {part['best']}."


register(
    Section(TABLE, lambda cfg, build, runs: collect(runs) if runs else None, markdown, _terminal)
)
