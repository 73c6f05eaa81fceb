"""What both parts of the report share: the finished `kdcache train` runs under a folder, and the
students' top-1 agreement with their teacher recomputed on their eval data."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from kdcache.stages.common.hooks import logits_of
from kdcache.stages.evaluate.run import dataset_batches
from kdcache.stages.train.run_folder import RunFolder
from kdcache.storage.fsio import open_location
from kdcache.storage.reader import CacheReader


def model_fields(s: dict) -> dict:
    """What every report entry says of a run's model, whichever job the run belongs to."""
    return {
        "model": s["student"].rsplit(":", 1)[-1],
        "spec": s["student"],
        "model_args": s.get("student_args") or {},
        "num_params": s.get("num_params"),
        "agreement": None,  # recomputed on the eval data when the models are loaded
        "cache_agreement": s.get("final", {}).get("agreement"),
    }


def open_cache(url: str, users: list[dict]) -> tuple[dict, CacheReader | None]:
    """A cache's report entry so far and its reader; a moved or deleted cache still deserves a
    report, so it becomes an entry with its error instead of a failure."""
    info: dict = {"url": url, "students": [e["name"] for e in users]}
    try:
        return info, CacheReader(url)
    except Exception as exc:  # noqa: BLE001 - any reason the cache cannot be read is reported
        info["error"] = f"{type(exc).__name__}: {exc}"
        return info, None


def load_run(folder: RunFolder) -> dict | None:
    """summary.json (+ parsed metrics.csv) of a finished run, None when it has not finished."""
    summary = folder.summary()
    if summary is None:
        return None
    summary["_rows"], summary["_folder"] = folder.rows(), folder.url
    summary["_finished_at"] = folder.finished_at()
    return summary


def load_runs(url: str) -> tuple[list[dict], list[str]]:
    """(the finished runs in the folders under `url`, in training order; the unfinished names).
    Training order (summary.json is written last), so a table follows the job file."""
    parent = open_location(url)
    names = [n for n in parent.listdir() if parent.is_dir(n)] if parent.is_dir() else []
    runs = [(n, load_run(RunFolder(f"{parent.url.rstrip('/')}/{n}"))) for n in names]
    finished = [s for _, s in runs if s is not None]
    finished.sort(key=lambda s: (s["_finished_at"], s["name"]))
    return finished, [n for n, s in runs if s is None]


def memo_build(build) -> SimpleNamespace:
    """`build` that loads each run's model and each eval data set once: agreement and the
    deployment figures both need them."""
    students, datasets = {}, {}

    def student(folder: str):
        if folder not in students:
            students[folder] = build.student(folder)
        return students[folder]

    def dataset(spec: str, args: dict):
        key = json.dumps([spec, args], sort_keys=True)
        if key not in datasets:
            datasets[key] = build.dataset(spec, args)
        return datasets[key]

    return SimpleNamespace(student=student, dataset=dataset)


@torch.no_grad()
def row_predictions(model, data) -> np.ndarray:
    """The model's top-1 class for every row of a classifier's data."""
    model.eval()
    out = [logits_of(model(x)).argmax(-1) for x, _ in dataset_batches(data, 1024)]
    return torch.cat(out).numpy()


def agreements(teacher: dict, students: list[dict], build, predictions=row_predictions) -> None:
    """Fill each student's `agreement`: the share of its eval data's predictions (rows, or tokens
    with the LM's `predictions`) where its top-1 is the teacher's."""
    t_model = build.student(teacher["folder"])
    t_preds: dict[str, np.ndarray] = {}
    for e in students:
        spec, args = e["eval_data"]
        if not spec:
            continue
        key = json.dumps([spec, args], sort_keys=True)
        data = build.dataset(spec, args)
        if key not in t_preds:
            t_preds[key] = predictions(t_model, data)
        t_pred = t_preds[key]
        s_model = build.student(e["folder"])
        e["agreement"] = float((predictions(s_model, data) == t_pred).mean())
