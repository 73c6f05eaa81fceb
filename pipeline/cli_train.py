"""`kdcache train` (one student, or several from a TOML `[[students]]` list) and `kdcache evaluate`.

With several students, CLI options apply to every student (they beat the file); each student's
table overrides the file's shared top-level options and trains into OUT/<name>.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time

import click

from kdcache.pipeline.cli_common import (
    build_config,
    common_options,
    emit,
    handle_errors,
    setup_logging,
)
from kdcache.pipeline.runtime import process_group
from kdcache.pipeline.specs import load_config, normalise_keys
from kdcache.storage.errors import KdcacheError, UsageError

REQUIRED = ("student", "data", "out")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _kv(help_text: str):
    return click.option(help_text.split()[0], multiple=True, help=" ".join(help_text.split()[1:]))


@click.command()
@click.option("--config", type=click.Path(), help="TOML job file; may list [[students]].")
@click.option("--cache", help="Store URL from `kdcache precompute`; omit to train on hard labels.")
@click.option("--student", help="Student spec package.module:attr (class or factory).")
@_kv("--student-arg k=v keyword for the student (repeatable).")
@click.option("--data", help="The data set the cache was made from (joined by sample_id).")
@_kv("--data-arg k=v keyword for the data set (repeatable).")
@click.option("--eval-data", help="Labeled data set evaluated after every epoch.")
@_kv("--eval-data-arg k=v keyword for the eval data set (repeatable).")
@click.option("--out", help="Output folder or URL (metrics.csv, checkpoints, model.pt, summary).")
@click.option("--temperature", type=float, help="Distillation T > 0 (default: the cache's T).")
@click.option("--alpha", type=float, help="Weight of the soft loss in [0, 1] (default 0.9).")
@click.option("--beta", type=float, help="Weight of the feature loss >= 0 (default 0).")
@click.option("--student-features", help="Student submodule whose output matches the features.")
@click.option("--pool", type=click.Choice(["avg", "token-mean", "cls", "flatten"]), help="Pooling.")
@click.option("--epochs", type=int, help="Epochs (default 20).")
@click.option("--batch-size", type=int, help="Batch size (default 256).")
@click.option("--lr", type=float, help="Peak AdamW learning rate (default 1e-3).")
@click.option("--weight-decay", type=float, help="AdamW weight decay (default 0.01).")
@click.option("--warmup", type=float, help="Warmup as a fraction of all steps (default 0.05).")
@click.option("--seed", type=int, help="Seed of the student's init and the data order.")
@click.option("--num-workers", type=int, help="DataLoader workers (default 0).")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps (default auto).")
@click.option("--threads", type=int, help="Torch CPU threads (default: torch's choice).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), help="Autocast precision.")
@_kv("--storage-option k=v fsspec storage option (repeatable).")
@click.option("--ignore-fingerprint", is_flag=True, default=None, help="Train on other --data.")
@click.option("--buffer-size", type=int, help="Shuffle buffer rows (default 16384).")
@click.option("--prefetch", type=int, help="Shards read ahead (default 2).")
@click.option("--parallel", type=int, help="With [[students]]: train N at once (subprocesses).")
@click.option("--only", hidden=True, help="With [[students]]: train just this one.")
@common_options
@handle_errors
def train(**options) -> None:
    """Stage two: train a student from a cache (soft labels + features), or from labels alone."""
    from kdcache.pipeline.jobs import done_before, trainer
    from kdcache.stages.train import TrainConfig

    setup_logging(bool(options.get("quiet")), bool(options.get("log_json")))
    log_json = bool(options.get("log_json"))
    argv = _argv(options)
    file_opts = load_config(options.pop("config"))
    parallel = options.pop("parallel") or file_opts.pop("parallel", None) or 1
    only = options.pop("only")
    students = file_opts.pop("students", None)
    if students is None:
        configs = [build_config(TrainConfig, None, options, REQUIRED, file_opts=file_opts)]
    else:
        configs = _student_configs(TrainConfig, file_opts, students, options, only)
    with process_group(configs[0].device) as dist, contextlib.ExitStack() as cleanup:
        # Options, cache, data and student of every student, before the first one trains; each
        # trainer is built once (a finished run gives its summary instead).
        datasets: dict = {}
        trainers = []
        for cfg in configs:
            t = trainer(cfg, dist, datasets)
            trainers.append(t if isinstance(t, dict) else cleanup.enter_context(t))
        if len(configs) > 1 and parallel > 1:
            cleanup.close()  # the children build their own
            _run_parallel([c.name for c in configs], argv, parallel)
            return
        for cfg, t in zip(configs, trainers, strict=True):
            result = done_before(t) if isinstance(t, dict) else t.run()
            _report(log_json, cfg, result)


def _student_configs(cls, shared: dict, students, options: dict, only: str | None) -> list:
    if not isinstance(students, list) or not all(isinstance(s, dict) for s in students):
        raise UsageError("[[students]] in --config must be a list of tables")
    out = options.get("out") or shared.get("out")
    if not out:
        raise UsageError("missing --out (the parent folder of every student's own folder)")
    configs, seen = [], set()
    for raw in students:
        student = normalise_keys(raw)
        name = student.get("name")
        if not isinstance(name, str) or not NAME.match(name) or name in seen:
            raise UsageError(
                f"every [[students]] table needs a unique name of letters, digits, _ . -: {name!r}"
            )
        if "out" in student:
            raise UsageError(f"student {name!r} sets out: each student trains into OUT/{name}")
        seen.add(name)
        merged = {**shared, **student, "out": f"{out.rstrip('/')}/{name}"}
        configs.append(build_config(cls, None, {**options, "out": None}, REQUIRED, merged))
    if only is not None:
        configs = [c for c in configs if c.name == only]
        if not configs:
            raise UsageError(f"--only {only!r} names no student in --config ({sorted(seen)})")
    return configs


def _argv(options: dict) -> list[str]:
    """The command line that reproduces these options (for --parallel children)."""
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key in ("parallel", "only") or value in (None, False, ()):
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, tuple):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv


def _run_parallel(names: list[str], argv: list[str], n: int) -> None:
    """Each student in its own `kdcache train --only NAME` process, at most n at once."""
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    base = [sys.executable, "-c", "from kdcache.pipeline.cli import main; main()", "train", *argv]
    pending, running, failed = list(names), {}, []
    while pending or running:
        while pending and len(running) < n:
            name = pending.pop(0)
            running[name] = subprocess.Popen([*base, "--only", name], env=env)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode:
                    failed.append(f"{name} (exit {proc.returncode})")
        time.sleep(0.1)
    if failed:
        raise KdcacheError(f"{len(failed)} student(s) failed: {', '.join(failed)}")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _report(log_json: bool, cfg, result: dict) -> None:
    s = result["summary"]
    if s is None:  # not rank 0, or stopped early
        return
    f, b = s["final"], s["best"]
    if result["status"] == "done-before":
        text = (
            f"already trained: {cfg.out}/summary.json holds this run ({s['name']}: eval_accuracy "
            f"{_pct(f['eval_accuracy'])}); nothing to do"
        )
    else:
        text = (
            f"trained {s['name']}: eval_accuracy {_pct(f['eval_accuracy'])} (best "
            f"{_pct(b['eval_accuracy'])} at epoch {b['epoch']}), agreement {_pct(f['agreement'])}, "
            f"{s['epochs']} epochs in {s['wall_seconds']:.1f}s "
            f"({s['samples_per_sec'] or 0:.0f} samples/s) -> {cfg.out}"
        )
    emit(log_json, text, status=result["status"], out=cfg.out, **{"final": f, "best": b})


@click.command()
@click.option("--checkpoint", help="A finished `kdcache train --out` folder (or URL).")
@click.option("--data", help="Labeled data set to evaluate on.")
@_kv("--data-arg k=v keyword for the data set (repeatable).")
@click.option("--cache", help="Also report agreement with this cache's teacher top-1.")
@click.option("--batch-size", type=int, help="Evaluation batch size (default 1024).")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps (default auto).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), help="Autocast precision.")
@click.option("--ignore-fingerprint", is_flag=True, default=None, help="Skip the cache data check.")
@_kv("--storage-option k=v fsspec storage option (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def evaluate(as_json: bool, **options) -> None:
    """Accuracy, ECE (and teacher agreement with --cache) of a trained student."""
    from kdcache.pipeline.jobs import evaluate as run
    from kdcache.stages.evaluate import EvaluateConfig

    setup_logging(True, False)
    cfg = build_config(EvaluateConfig, None, options, ("checkpoint", "data"))
    result = run(cfg)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for key in ("name", "student", "data", "n", "accuracy", "ece", "loss", "agreement"):
        value = result.get(key)
        text = "-" if value is None else f"{value:.4f}" if isinstance(value, float) else value
        click.echo(f"{key:<10} {text}")
