"""The language-model job's part of the report: its teacher, its students and the caches they read.

The job's runs live under `--lm` (default RUNS/lm): `teacher/` (a causal-lm `kdcache train` folder)
and `students/<name>/`, each taught one of three ways: hard next-token labels only, a cache (the
store its `cache` setting names), or the teacher online (its summary.json has `online_teacher` and
the measured `teacher_seconds`). Losses are each run's final epoch on its eval data, in
nats/token. Agreement is recomputed here on that same validation data for every student (the
share of real tokens where the student's top-1 next token is the teacher's): the trainer's own
figure (`final.agreement`, kept as `cache_agreement`) exists only for cache students, is measured
on cached training rows, and for a sampled store against the most-drawn token.

Teacher time, with t the cache's `stats.teacher_seconds` (one teacher pass over the train split)
and E the epochs summed over the students that read it: online KD would run the teacher E times,
E * t; the cache paid t once, so it saved (E - 1) * t. An online student's measured
`teacher_seconds` per epoch, times E, checks that estimate.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdcache.stages.report import lm_groups
from kdcache.stages.report.runs import agreements, load_run, load_runs, model_fields, open_cache
from kdcache.stages.report.sections import Section, register
from kdcache.stages.tasks import causal_lm as lm
from kdcache.stages.train.run_folder import RunFolder
from kdcache.storage.fsio import open_location

HARD, CACHE, ONLINE = "hard labels", "cache", "teacher online"
# The headline is the one place here that picks students by codec (tables and plots never do).
SAMPLED, TOPK = "sampled", "topk"


@torch.no_grad()
def token_predictions(model, data):
    """The model's top-1 next token at every target token of `data`, packed in row order."""
    model.eval()
    out = []
    # Small batches: a batch's logits are B * L * vocabulary floats.
    for a in range(0, len(data), 8):
        x = lm.inputs(data, np.arange(a, min(len(data), a + 8)))
        z = lm.logits(model, x)
        out.append(z.argmax(-1)[lm.target_mask(x).bool()])
    return torch.cat(out).numpy()


def _taught(s: dict) -> str:
    st = s.get("settings", {})
    if s.get("online_teacher"):
        return ONLINE
    distilled = s.get("cache") and (st.get("alpha", 0) > 0 or st.get("beta", 0) > 0)
    return CACHE if distilled else HARD


def _entry(s: dict, role: str) -> dict:
    st, final = s.get("settings", {}), s.get("final", {})
    taught = _taught(s) if role == "student" else HARD
    train = s.get("train_seconds")
    return {
        "name": s["name"] if role == "student" else "teacher",
        "role": role,
        "taught": taught,
        "cache": s.get("cache") if taught == CACHE else None,
        "cache_fingerprint": s.get("cache_fingerprint"),
        "online_teacher": s.get("online_teacher"),
        **model_fields(s),
        "eval_loss": final.get("eval_loss"),
        "eval_perplexity": final.get("eval_perplexity"),
        "epochs": s.get("epochs"),
        "trainer": st.get("trainer", "kdcache train"),
        "train_seconds": train if train is not None else s.get("wall_seconds"),
        "wall_seconds": s.get("wall_seconds"),
        "tokens_per_sec": s.get("tokens_per_sec"),
        "teacher_seconds": s.get("teacher_seconds"),
        "eval_data": [st.get("eval_data"), st.get("eval_data_args") or {}],
        "curve": [[r["epoch"], r["eval_loss"]] for r in s["_rows"] if r["eval_loss"] is not None],
        "folder": s["_folder"],
    }


def _cache_info(url: str, users: list[dict], online: dict | None) -> dict:
    info, r = open_cache(url, users)
    if r is None:
        return info
    stats, codec = r.manifest.get("stats", {}), r.codec
    t, epochs = stats.get("teacher_seconds"), sum(e["epochs"] or 0 for e in users)
    first = codec.options[0].name if codec.options else None
    info.update(
        codec=codec.name,
        codec_label=codec.label(),
        # What a plot can print beside a point: the codec and its size option (N or k).
        short_label=codec.name + (f" ({first}={codec.settings.get(first)})" if first else ""),
        codec_error=codec.error_text(stats),
        **codec.describe(stats),
        soft_labels=r.manifest.get("soft_labels"),
        bytes_per_token=stats.get("bytes_per_token"),
        disk_bytes_per_token=stats.get("disk_bytes_per_token"),
        tokens=stats.get("tokens"),
        total_bytes=stats.get("total_bytes"),
        teacher_seconds=t,
        fingerprint=r.fingerprint,
        stale_students=[e["name"] for e in users if e["cache_fingerprint"] != r.fingerprint],
        epochs=epochs,
        online_equivalent_seconds=None if t is None else epochs * t,
        saved_seconds=None if t is None or not users else (epochs - 1) * t,
        online_measured_seconds=None,
    )
    if online and online["teacher_seconds"] is not None and online["epochs"]:
        per_epoch = online["teacher_seconds"] / online["epochs"]
        info["online_measured_seconds"] = per_epoch * epochs
    return info


def _diff(a: dict | None, b: dict | None) -> float | None:
    """a's validation loss minus b's (negative: a is better), None when either is missing."""
    return None if a is None or b is None else a["eval_loss"] - b["eval_loss"]


def _met(value: float | None, target: float | None, ok) -> bool | None:
    return None if value is None or target is None else bool(ok(value, target))


def headline(groups: list[dict], near_online=None, over_hard_by=None) -> dict:
    """The comparisons the field cares about, between the students' seed groups (their mean
    losses, `lm_groups`), each judged against the job's target when it gives one
    (`near_online`, `over_hard_by`, nats/token; None: no verdict)."""
    scored = [e for e in groups if e["eval_loss"] is not None]
    cached = [e for e in scored if e["taught"] == CACHE]
    pick = lambda rows: min(rows, key=lambda e: e["eval_loss"]) if rows else None  # noqa: E731
    first = lambda taught: next((e for e in scored if e["taught"] == taught), None)  # noqa: E731
    # The sampled student with the most seeds (then the lowest loss): the one the target is of.
    sampled_groups = [e for e in cached if e.get("codec") == SAMPLED]
    sampled = min(sampled_groups, key=lambda e: (-e["n"], e["eval_loss"]), default=None)
    topk = [e for e in cached if e.get("codec") == TOPK and lm_groups.file_bytes(e)]
    matched = None
    if sampled and lm_groups.file_bytes(sampled) and topk:
        size = lm_groups.file_bytes(sampled)
        matched = min(topk, key=lambda e: abs(math.log(lm_groups.file_bytes(e) / size)))
    online, hard, best = first(ONLINE), first(HARD), pick(cached)
    worst = max(cached, key=lambda e: e["eval_loss"]) if cached else None
    vs_online, vs_topk = _diff(sampled, online), _diff(sampled, matched)
    over_hard, worst_over_hard = _diff(hard, best), _diff(hard, worst)
    name = lambda e: e and e["name"]  # noqa: E731
    return {
        "sampled_student": name(sampled),
        "online_student": name(online),
        "matched_topk_student": name(matched),
        "best_cache_student": name(best),
        "worst_cache_student": name(worst),
        "hard_student": name(hard),
        "sampled_minus_online": vs_online,
        "sampled_minus_online_paired": lm_groups.paired(sampled, online),
        "sampled_minus_matched_topk": vs_topk,
        "sampled_minus_matched_topk_paired": lm_groups.paired(sampled, matched),
        "hard_minus_best_cache": over_hard,
        "hard_minus_worst_cache": worst_over_hard,
        "target_values": {"near_online": near_online, "over_hard": over_hard_by},
        "targets": {
            f"sampled within {near_online} of online": _met(
                vs_online, near_online, lambda d, t: d <= t
            ),
            "sampled better than matched topk": _met(vs_topk, 0.0, lambda d, t: d < t),
            f"every cache student >= {over_hard_by} better than hard": _met(
                worst_over_hard, over_hard_by, lambda d, t: d >= t
            ),
        },
    }


def collect_lm(cfg, build) -> dict | None:
    """The LM part of the report (report.json's `lm`), None when `cfg.lm` does not exist."""
    if not open_location(cfg.lm).is_dir():
        return None
    root = cfg.lm.rstrip("/")
    finished, unfinished = load_runs(f"{root}/students")
    students = [_entry(s, "student") for s in finished]
    teacher_run = load_run(RunFolder(f"{root}/teacher"))
    teacher = _entry(teacher_run, "teacher") if teacher_run else None
    if teacher and cfg.agreement:
        agreements(teacher, students, build, token_predictions)
    online = next((e for e in students if e["taught"] == ONLINE), None)
    urls = sorted({e["cache"] for e in students if e["cache"]})
    caches = [_cache_info(u, [e for e in students if e["cache"] == u], online) for u in urls]
    by_url = {c["url"]: c for c in caches}
    for e in students:
        c = by_url.get(e["cache"], {})
        e["agreement_on"] = "validation tokens" if e["agreement"] is not None else None
        if e["agreement"] is None and e["cache_agreement"] is not None:
            e["agreement"], e["agreement_on"] = e["cache_agreement"], "cached training tokens"
        for key in (
            "codec",
            "codec_label",
            "short_label",
            "bytes_per_token",
            "disk_bytes_per_token",
        ):
            e[key] = c.get(key)
        e["store_bytes"] = c.get("total_bytes")
    groups = lm_groups.group(students)
    return {
        "folder": cfg.lm,
        "teacher": teacher,
        "students": students,
        "groups": groups,
        "unfinished": unfinished,
        "caches": caches,
        "headline": headline(groups, cfg.lm_near_online, cfg.lm_over_hard),
    }


def _markdown(part: dict) -> list[str]:
    from kdcache.stages.report import lm_text

    return lm_text.lm_markdown(part)


def _terminal(part: dict) -> tuple[str, str]:
    from kdcache.stages.report import lm_text

    return lm_text.terminal(part)


# The LM job's runs live in their own folder (--lm), not among RUNS/students.
register(Section("lm", lambda cfg, build, runs: collect_lm(cfg, build), _markdown, _terminal))
