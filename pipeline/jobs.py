"""The executor of every stage: join the process group, pick the device, build data sets and
models from their specs, hand them to the stage, and leave the group as it was found.

Stages (kdcache.stages) never resolve a spec or touch torch.distributed's setup themselves: they
receive built objects, a `Dist` (rank, world_size, is_main, barrier, broadcast, decide) and a
`torch.device`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from types import SimpleNamespace

import torch

from kdcache.pipeline.data import load_dataset
from kdcache.pipeline.hf_models import check_positions
from kdcache.pipeline.models import load_model, random_init, saved_settings
from kdcache.pipeline.runtime import Dist, process_group, resolve_device
from kdcache.pipeline.specs import augmentation
from kdcache.stages import tasks
from kdcache.stages.common.device import placed_device
from kdcache.stages.evaluate import deploy
from kdcache.stages.evaluate import run as evaluate_stage
from kdcache.stages.precompute import run as precompute_stage
from kdcache.stages.report import run as report_stage
from kdcache.stages.train.run_folder import RunFolder
from kdcache.stages.train.trainer import TrainConfig, Trainer, finished, resolve
from kdcache.storage.errors import UsageError
from kdcache.storage.fsio import open_location
from kdcache.storage.reader import CacheReader

log = logging.getLogger("kdcache")


def precompute(cfg: precompute_stage.PrecomputeConfig) -> dict:
    """Stage one; returns {"status": "hit" | "done", "manifest": ..., ...}."""
    cfg.validate()  # every problem at once, before anything is built (the stage resolves it)
    started = time.perf_counter()
    with process_group(cfg.device) as dist, cpu_threads(cfg.threads):
        device = resolve_device(cfg.device, dist.local_rank)
        ds = load_dataset(cfg.data, cfg.data_args)
        model, teacher_id = load_model(
            cfg.teacher, cfg.teacher_args, cfg.checkpoint, cfg.storage_options
        )
        check_positions(model, ds)
        if cfg.checkpoint is None and not cfg.random_teacher:
            untrained_teacher(cfg.teacher, cfg.teacher_args, model, refuse=True)
        augment = augmentation(cfg.augment, cfg.augment_args)
        placed = placed_device(model)
        if placed is not None:  # spread over devices by its loader: used as placed
            device = placed
        else:
            model = model.to(device)
        return precompute_stage.run(cfg, model, teacher_id, ds, dist, device, started, augment)


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """torch's intra-op thread count set to `n` for the job (None: left as it is), then restored:
    an in-process caller (a notebook, the tests) keeps its own."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


def untrained_teacher(spec: str, kwargs: dict, model, refuse: bool) -> None:
    """Refuse (`refuse`) or warn about a teacher built from a spec alone whose weights are random
    initial weights: it costs a second build of the spec, only when no checkpoint is given."""
    if not random_init(spec, kwargs, model):
        return
    text = (
        f"--teacher {spec} has random initial weights (no checkpoint given, and the spec builds "
        "other weights under another seed): its soft labels teach nothing"
    )
    if refuse:
        raise UsageError(
            f"{text}; pass --checkpoint FILE with the trained weights, or --random-teacher to "
            "precompute it anyway"
        )
    log.warning("warning: %s", text)


def trainer(cfg: TrainConfig, dist: Dist, datasets: dict | None = None) -> Trainer | dict:
    """The built and checked Trainer of one student, or the summary of an identical finished run
    (then there is nothing to do). `datasets` shares data sets between the students of a job."""
    cfg.validate()
    reader = CacheReader(cfg.cache, cfg.storage_options, cfg.verify_reads) if cfg.cache else None
    # Resolved once, the same on every rank (the same config and store); the user's is untouched.
    cfg = resolve(cfg, reader)
    folder = RunFolder(cfg.out, cfg.storage_options)
    done = dist.decide(lambda: finished(cfg, folder))
    if done is not None:
        return done
    device = resolve_device(cfg.device, dist.local_rank)
    cache = {} if datasets is None else datasets

    def dataset(spec: str, kwargs: dict):
        key = json.dumps([spec, kwargs], sort_keys=True, default=str)
        if key not in cache:
            cache[key] = load_dataset(spec, kwargs)
        return cache[key]

    data = dataset(cfg.data, cfg.data_args)
    eval_data = dataset(cfg.eval_data, cfg.eval_data_args) if cfg.eval_data else None
    teacher = None
    if cfg.online:
        # Built before the student's seed is set: a seeded teacher factory leaves the student's
        # initial weights and data order those of the same run from a cache.
        teacher = load_model(
            cfg.teacher,
            cfg.teacher_args,
            cfg.teacher_checkpoint,
            cfg.storage_options,
            flag="--teacher-checkpoint",
        )
        if cfg.teacher_checkpoint is None:
            # The online run is a reference, not a cache used for months: a warning is enough.
            untrained_teacher(cfg.teacher, cfg.teacher_args, teacher[0], refuse=False)
    # The student's initial weights are part of the run: seeded right before it is built.
    torch.manual_seed(cfg.seed)
    student, _ = load_model(cfg.student, cfg.student_args, None, what="--student")
    check_positions(student, data, "--student")
    augment = augmentation(cfg.augment, cfg.augment_args)
    return Trainer(
        cfg, dist, device, reader, folder, data, eval_data, student, teacher, augment=augment
    )


def done_before(summary: dict) -> dict:
    return {"status": "done-before", "summary": summary, "history": []}


def train(cfg: TrainConfig, stop_after_epoch: int | None = None) -> dict:
    """Train (or resume, or recognise as done) one student; returns {"status", "summary", ...}.

    `stop_after_epoch` ends the run cleanly after that epoch, as a kill would (tests, schedulers).
    """
    with process_group(cfg.device) as dist:
        t = trainer(cfg, dist)
        if isinstance(t, dict):
            return done_before(t)
        with t:
            return t.run(stop_after_epoch)


def load_student(folder: str, storage_options: dict | None = None):
    """(student in eval mode, its summary.json) from a finished `kdcache train --out` folder."""
    run = RunFolder(folder, storage_options)
    summary = run.summary()
    if summary is None:
        raise UsageError(
            f"--checkpoint {folder!r} has no summary.json: point it at a finished "
            "`kdcache train --out` folder (rerun that command to finish training)"
        )
    model, _ = load_model(
        summary["student"],
        summary.get("student_args") or {},
        run.model_url,
        storage_options,
        "--student",
    )
    return model, summary


def evaluated_model(cfg: evaluate_stage.EvaluateConfig):
    """(model, summary) of `--checkpoint`: a finished run folder, or a bare weights file (its
    model from --student, or from the settings a trainer's checkpoint-N.pt records)."""
    url = cfg.checkpoint
    if open_location(url, cfg.storage_options).is_dir():
        if cfg.student:
            raise UsageError(
                f"--student {cfg.student}: --checkpoint {url} is a run folder that names its own "
                "student; give --student with a model.pt or checkpoint-N.pt file only"
            )
        return load_student(url, cfg.storage_options)
    saved = saved_settings(url, cfg.storage_options)
    spec, args = cfg.student, cfg.student_args
    if spec is None:
        spec, args = saved.get("student"), args or saved.get("student_args") or {}
    model, _ = load_model(spec, args, url, cfg.storage_options, "--student")
    task = cfg.task or saved.get("task") or tasks.DEFAULT
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return model, {"name": name, "student": spec, "student_args": args, "settings": {"task": task}}


def evaluate(cfg: evaluate_stage.EvaluateConfig) -> dict:
    """Accuracy, ECE and loss on `cfg.data`; agreement with the cache's teacher when given; with
    `cfg.deploy` what the model costs on a CPU, float and int8 (stages/evaluate/deploy.py)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    model, summary = evaluated_model(cfg)
    ds = load_dataset(cfg.data, cfg.data_args)
    reader = cache_data = None
    if cfg.cache:
        reader = CacheReader(cfg.cache, cfg.storage_options, cfg.verify_reads)
        # Agreement needs the inputs of the cached rows: the data set named in the manifest.
        source = reader.manifest["data"]
        cache_data = load_dataset(source["spec"], source.get("kwargs") or {})
    result = evaluate_stage.run(cfg, model.to(device), summary, ds, device, reader, cache_data)
    if cfg.deploy:
        result["deploy"] = deploy.figures(model, ds, summary["settings"].get("task"))
    return result


# What the report stage may build: a finished run's student, and a data set from its spec.
REPORT_BUILD = SimpleNamespace(student=lambda folder: load_student(folder)[0], dataset=load_dataset)


def report(cfg: report_stage.ReportConfig) -> dict:
    """Write report.md, report.json and the plots; returns the report."""
    return report_stage.run(cfg, REPORT_BUILD)


def collect_report(cfg: report_stage.ReportConfig) -> dict:
    """The report as a dict, nothing written."""
    return report_stage.collect(cfg, REPORT_BUILD)
