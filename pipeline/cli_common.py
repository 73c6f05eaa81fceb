"""What every kdcache command shares: error handling, logging, and options from a config file."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
import time

import click

from kdcache.pipeline.specs import load_config, merge_options, parse_kv
from kdcache.storage.errors import KdcacheError, UsageError
from kdcache.storage.fsio import parse_storage_options

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 75


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        return json.dumps(doc, default=str)


def setup_logging(quiet: bool, log_json: bool) -> None:
    root = logging.getLogger("kdcache")
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_json else logging.Formatter("kdcache: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def emit(log_json: bool, text: str, **fields) -> None:
    """A command's result on stdout: human text, or one JSON object with --log-json."""
    if log_json:
        click.echo(
            json.dumps({"time": round(time.time(), 3), "message": text, **fields}, default=str)
        )
    else:
        click.echo(text)


def common_options(fn):
    fn = click.option("--quiet", is_flag=True, default=None, help="No progress bar or info logs.")(
        fn
    )
    fn = click.option(
        "--log-json", is_flag=True, default=None, help="Logs and results as JSON lines."
    )(fn)
    return fn


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so that `finally` blocks run (the store lock is released)."""


def _raise_terminated(signum, frame):
    raise Terminated


def release_on_sigterm() -> None:
    """Schedulers stop jobs with SIGTERM (Slurm preemption, `kill`, Kubernetes): by default Python
    dies at once and leaves its lock for `stale_after` seconds; this unwinds like Ctrl-C."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def handle_errors(fn):
    """One clear line and a documented exit code instead of a traceback wall."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KdcacheError as exc:
            click.echo(f"kdcache: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            click.echo(f"kdcache: {what}; rerun the same command to resume", err=True)
            sys.exit(143 if isinstance(exc, Terminated) else 130)
        except (click.ClickException, click.exceptions.Exit, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if os.environ.get("KDCACHE_DEBUG"):
                raise
            click.echo(
                f"kdcache: error: {type(exc).__name__}: {exc} "
                "(set KDCACHE_DEBUG=1 to see the traceback)",
                err=True,
            )
            sys.exit(EXIT_FAIL)

    return wrapper


def build_config(
    cls,
    config_path: str | None,
    cli: dict,
    required: tuple[str, ...],
    file_opts: dict | None = None,
):
    """Dataclass config from defaults < TOML file < CLI, with k=v lists folded into dicts.

    `file_opts` stands in for the file when the caller has already read it (several students).
    """
    defaults = {
        f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        for f in dataclasses.fields(cls)
    }
    for name, value in defaults.items():
        if value is dataclasses.MISSING:
            defaults[name] = None  # a field without a default: `required` reports it if unset
    for name in required:
        defaults.setdefault(name, None)
    file_opts = load_config(config_path) if file_opts is None else dict(file_opts)
    cli = dict(cli)
    for single, plural in (
        ("teacher_arg", "teacher_args"),
        ("data_arg", "data_args"),
        ("student_arg", "student_args"),
        ("eval_data_arg", "eval_data_args"),
    ):
        if single in cli:
            pairs = cli.pop(single)
            if plural in defaults:
                merged = dict(file_opts.get(plural, {}))
                merged.update(parse_kv(pairs, "--" + single.replace("_", "-")))
                cli[plural] = merged or None
    if "storage_option" in cli:
        pairs = cli.pop("storage_option")
        merged = dict(file_opts.get("storage_options", {}))
        merged.update(parse_storage_options(pairs))
        cli["storage_options"] = merged or None
    for key in ("log_json", "config"):
        cli.pop(key, None)
        file_opts.pop(key, None)
    opts = merge_options(defaults, file_opts, cli)
    missing = [n for n in required if opts.get(n) in (None, "")]
    if missing:
        names = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise UsageError(f"missing {names} (on the command line or in --config)")
    return cls(**opts)
