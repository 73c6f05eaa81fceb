"""What every kdcache command shares: error handling, logging, and options from a config file."""

from __future__ import annotations

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
from kdcache.stages.common.config import QUIET_HELP
from kdcache.storage.errors import KdcacheError, UsageError
from kdcache.storage.fsio import io_failure
from kdcache.storage.options import options_of

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
    fn = click.option("--quiet", is_flag=True, default=None, help=QUIET_HELP)(fn)
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


def message_of(exc: KdcacheError) -> str:
    """The error's own message; one raised in a DataLoader worker arrives re-raised with the
    worker's traceback as its message, whose last line is `module.Class: <the message>`."""
    text = str(exc)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        return text.rstrip().splitlines()[-1].removeprefix(name)
    return text


def handle_errors(fn):
    """One clear line and a documented exit code instead of a traceback wall."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KdcacheError as exc:
            click.echo(f"kdcache: error: {message_of(exc)}", err=True)
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
            known = io_failure(exc)
            if known is not None:
                click.echo(f"kdcache: error: {known}", err=True)
                sys.exit(known.exit_code)
            click.echo(
                f"kdcache: error: {type(exc).__name__}: {exc} "
                "(set KDCACHE_DEBUG=1 to see the traceback)",
                err=True,
            )
            sys.exit(EXIT_FAIL)

    return wrapper


def build_config(cls, config_path: str | None, cli: dict, file_opts: dict | None = None, extra=()):
    """Dataclass config from defaults < TOML file < CLI, with k=v lists folded into dicts.

    `file_opts` stands in for the file when the caller has already read it (several students).
    `extra` are options that are not fields (a codec's): their values, from the command line or
    the file's top level, are gathered into the dict field of `cls` declared `collects`.
    """
    declared = options_of(cls)
    file_opts = load_config(config_path) if file_opts is None else dict(file_opts)
    for key in ("log_json", "config"):
        file_opts.pop(key, None)
    given = {}
    for opt in declared:
        value = cli.get(opt.name)
        if opt.type is dict and isinstance(value, tuple):  # k=v pairs beat the file's table
            value = {**file_opts.get(opt.name, {}), **parse_kv(value, opt.flag)} if value else None
        given[opt.name] = value
    gathered = {}
    for opt in extra:
        in_file = file_opts.pop(opt.name, None)
        value = in_file if cli.get(opt.name) is None else cli[opt.name]
        if value is not None:
            opt.validate(value)
            gathered[opt.name] = value
    if gathered:
        into = next(o.name for o in declared if o.collects)
        given[into] = {**file_opts.get(into, {}), **gathered}
    opts = merge_options({o.name: o.default for o in declared}, file_opts, given)
    missing = [o.flag for o in declared if o.required and opts.get(o.name) in (None, "")]
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (on the command line or in --config)")
    return cls(**opts)
