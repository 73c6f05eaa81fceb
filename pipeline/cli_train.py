"""`kdcache train` (one student, or several from a TOML `[[students]]` list) and `kdcache evaluate`.

With several students, CLI options apply to every student (they beat the file); each student's
table overrides the file's shared top-level options and trains into OUT/<name>.

Seeds: `seeds = [0, 1, 2]` at the file's top level (or `--seeds 0,1,2`, which beats it) or in a
student's table (which beats both) trains that student once per seed, as NAME-seedK with
`seed = K`; `--only` takes NAME-seedK (one run) or NAME (all its seeds). The report groups the
runs of one student and gives their mean and spread.
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
    release_on_sigterm,
    setup_logging,
)
from kdcache.pipeline.cli_options import click_options
from kdcache.pipeline.runtime import process_group
from kdcache.pipeline.specs import load_config, normalise_keys
from kdcache.stages.evaluate.config import EvaluateConfig
from kdcache.stages.train.config import TrainConfig
from kdcache.storage import faults
from kdcache.storage.errors import KdcacheError, UsageError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@click.command()
@click.option("--config", type=click.Path(), help="TOML job file; may list [[students]].")
@click_options(TrainConfig)
@click.option("--parallel", type=int, help="With [[students]]: train N at once (subprocesses).")
@click.option("--only", hidden=True, help="With [[students]]: train just this one.")
@click.option(
    "--seeds",
    help="With [[students]]: train each student once per seed (comma list, e.g. 0,1,2), as "
    "NAME-seedK.",
)
@common_options
@handle_errors
def train(**options) -> None:
    """Stage two: train a student from a cache (soft labels + features), or from labels alone."""
    from kdcache.pipeline.jobs import done_before, trainer

    setup_logging(bool(options.get("quiet")), bool(options.get("log_json")))
    log_json = bool(options.get("log_json"))
    argv = _argv(options)
    file_opts = load_config(options.pop("config"))
    parallel = options.pop("parallel") or file_opts.pop("parallel", None) or 1
    only = options.pop("only")
    file_seeds = file_opts.pop("seeds", None)
    seeds = _seeds(options.pop("seeds"), "--seeds")
    if seeds is None:
        seeds = _seeds(file_seeds, "seeds in --config")
    if seeds is not None and options.get("seed") is not None:
        raise UsageError(
            "--seed and seeds together: the seeds list sets each run's seed; drop --seed"
        )
    students = file_opts.pop("students", None)
    if students is None:
        if seeds is not None:
            raise UsageError("--seeds needs a --config with [[students]]: pass --seed for one run")
        configs = [build_config(TrainConfig, None, options, file_opts=file_opts)]
    else:
        configs = _student_configs(TrainConfig, file_opts, students, options, only, seeds)
    release_on_sigterm()
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
            faults.point("train.student")


def _seeds(value, where: str) -> list[int] | None:
    """A seed list from `--seeds 0,1,2` or a TOML list; None when not given."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        seeds = [int(str(v).strip()) for v in (items if isinstance(items, list) else [items])]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(
            f"{where} {value!r}: give distinct non-negative integers, e.g. 0,1,2 (TOML: [0, 1, 2])"
        )
    return seeds


def _expand(student: dict, seeds: list[int] | None) -> list[dict]:
    """One table per seed (NAME-seedK, seed = K), or the table itself without seeds."""
    own = student.pop("seeds", None)
    seeds = _seeds(own, f"seeds of student {student.get('name')!r}") if own is not None else seeds
    if seeds is None:
        return [student]
    if "seed" in student:
        raise UsageError(
            f"student {student.get('name')!r} sets both seed and seeds: keep one of them"
        )
    return [student | {"name": f"{student.get('name')}-seed{k}", "seed": k} for k in seeds]


def _student_configs(
    cls, shared: dict, students, options: dict, only: str | None, seeds: list[int] | None = None
) -> list:
    if not isinstance(students, list) or not all(isinstance(s, dict) for s in students):
        raise UsageError("[[students]] in --config must be a list of tables")
    out = options.get("out") or shared.get("out")
    if not out:
        raise UsageError("missing --out (the parent folder of every student's own folder)")
    configs, seen, base = [], set(), {}
    tables = []
    for raw in students:
        student = normalise_keys(raw)
        name = student.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise UsageError(
                f"every [[students]] table needs a unique name of letters, digits, _ . -: {name!r}"
            )
        for one in _expand(dict(student), seeds):
            base[one["name"]] = name
            tables.append(one)
    for student in tables:
        name = student["name"]  # checked above; a seed suffix keeps it a NAME
        if name in seen:
            raise UsageError(
                f"every [[students]] table needs a unique name of letters, digits, _ . -: {name!r}"
            )
        if "out" in student:
            raise UsageError(f"student {name!r} sets out: each student trains into OUT/{name}")
        seen.add(name)
        merged = {**shared, **student, "out": f"{out.rstrip('/')}/{name}"}
        configs.append(build_config(cls, None, {**options, "out": None}, merged))
    if only is not None:
        configs = [c for c in configs if only in (c.name, base[c.name])]
        if not configs:
            raise UsageError(f"--only {only!r} names no student in --config ({sorted(seen)})")
    return configs


def _argv(options: dict) -> list[str]:
    """The command line that reproduces these options (for --parallel children)."""
    flags = {p.name: p.opts[0] for p in click.get_current_context().command.params}
    argv = []
    for key, value in options.items():
        if key in ("parallel", "only") or value in (None, False, ()):
            continue
        if value is True:
            argv.append(flags[key])
        elif isinstance(value, tuple):
            for v in value:
                argv += [flags[key], str(v)]
        else:
            argv += [flags[key], str(value)]
    return argv


def _run_parallel(names: list[str], argv: list[str], n: int) -> None:
    """Each student in its own `kdcache train --only NAME` process, at most n at once."""
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    base = [sys.executable, "-c", "from kdcache.pipeline.cli import main; main()", "train", *argv]
    pending, running, failed = list(names), {}, []
    try:
        while pending or running:
            while pending and len(running) < n:
                name = pending.pop(0)
                running[name] = subprocess.Popen([*base, "--only", name], env=env)
            for name, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    if proc.returncode:
                        failed.append(f"{name} (exit {proc.returncode})")
            faults.point("train.parallel")
            time.sleep(0.1)
    finally:
        # Stopped (SIGTERM, Ctrl-C) or failed: the children stop too, each at a clean point, or
        # they would go on training into folders the rerun of this command trains into.
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.wait()
    if failed:
        raise KdcacheError(f"{len(failed)} student(s) failed: {', '.join(failed)}")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _score(epoch: dict) -> str:
    """A run's headline metric: eval_accuracy, a causal-lm student's eval_perplexity, or a
    regression student's eval_mse."""
    if "eval_mse" in epoch:
        return "eval_mse " + ("-" if epoch["eval_mse"] is None else f"{epoch['eval_mse']:.4g}")
    if "eval_perplexity" in epoch:
        v = epoch["eval_perplexity"]
        return "eval_perplexity " + ("-" if v is None else f"{v:.2f}")
    return f"eval_accuracy {_pct(epoch['eval_accuracy'])}"


def _versus(f: dict) -> str:
    """How close the student is to its teacher: top-1 agreement, or MSE / R² for regression."""
    if "teacher_mse" not in f:
        return f"agreement {_pct(f['agreement'])}"
    mse, r2 = f["teacher_mse"], f["teacher_r2"]
    return (
        f"eval_r2 {'-' if f['eval_r2'] is None else format(f['eval_r2'], '.4f')}, vs teacher mse "
        f"{'-' if mse is None else format(mse, '.4g')} r2 {'-' if r2 is None else format(r2, '.4f')}"
    )


def _report(log_json: bool, cfg, result: dict) -> None:
    s = result["summary"]
    if s is None:  # not rank 0, or stopped early
        return
    f, b = s["final"], s["best"]
    if result["status"] == "done-before":
        text = (
            f"already trained: {cfg.out}/summary.json holds this run ({s['name']}: {_score(f)}); "
            "nothing to do"
        )
    else:
        text = (
            f"trained {s['name']}: {_score(f)} (best {_score(b).split()[-1]} at epoch "
            f"{b['epoch']}), {_versus(f)}, "
            f"{s['epochs']} epochs in {s['wall_seconds']:.1f}s "
            f"({s['samples_per_sec'] or 0:.0f} samples/s) -> {cfg.out}"
        )
    emit(log_json, text, status=result["status"], out=cfg.out, **{"final": f, "best": b})


@click.command()
@click_options(EvaluateConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def evaluate(as_json: bool, **options) -> None:
    """Accuracy, ECE (and teacher agreement with --cache) of a trained student; per token, with
    perplexity, for a causal-lm student."""
    from kdcache.pipeline.jobs import evaluate as run

    setup_logging(True, False)
    cfg = build_config(EvaluateConfig, None, options)
    result = run(cfg)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    keys = ("name", "student", "data", "n", "accuracy", "ece", "loss", "perplexity", "agreement")
    if "mse" in result:  # a regression student
        keys = ("name", "student", "data", "n", "mse", "mae", "r2", "teacher_mse", "teacher_r2")
    for key in (k for k in keys if k != "perplexity" or k in result):
        value = result.get(key)
        text = "-" if value is None else f"{value:.4f}" if isinstance(value, float) else value
        click.echo(f"{key:<{max(10, *map(len, keys))}} {text}")
    if result.get("deploy"):
        _deploy_lines(result["deploy"])


def _deploy_lines(d: dict) -> None:
    """The CPU deployment figures, the float model's and the int8 copy's (stages/evaluate/deploy.py)."""
    for label, f in (("float32", d), ("int8", d.get("int8"))):
        if not f:
            continue
        acc = f" accuracy {f['accuracy']:.4f}," if "accuracy" in f else ""
        click.echo(
            f"{label:<10}{acc} {f['params']:,} params, {f['weight_bytes']:,} bytes of weights, "
            f"latency {1e3 * f['latency_b1']:.3f} ms at batch 1, {1e3 * f['latency_b256']:.2f} ms "
            f"at batch 256 ({f['samples_per_sec']:,.0f} samples/s), {f['threads']} CPU thread(s)"
        )
