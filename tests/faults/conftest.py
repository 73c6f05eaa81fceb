"""The fault-injection campaign's shared machinery: rows for docs/RELIABILITY.md, runs to kill.

Each case calls `fault_row(...)` with what it injected and what the user saw; at teardown the row
gets the case's result (pass / FAIL / xfail) and, when KDCACHE_FAULT_ROWS names a file (as
`make faults` does), is appended to it as one JSON line. `python -m tests.faults.render` turns
those lines into the table. Paths, ports, pids and random prefixes are replaced by placeholders so
that the table does not change from one run to the next.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess

import pytest

from tests.conftest import REPO
from tests.faults.launcher import Launcher
from tests.integration.conftest import s3_endpoint, s3_url, s3fs_fresh  # noqa: F401

ROWS_ENV = "KDCACHE_FAULT_ROWS"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call" or (rep.when == "setup" and rep.outcome != "passed"):
        item.fault_outcome = rep
    return rep


def _result(item) -> str:
    rep = getattr(item, "fault_outcome", None)
    if rep is None:
        return "FAIL (not run)"
    if hasattr(rep, "wasxfail"):
        return f"xfail: {rep.wasxfail}" if rep.skipped else "pass (xfail no longer needed)"
    if rep.skipped:
        # longrepr of a skip is (file, line, "Skipped: why"): the table says why
        why = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else ""
        return f"skipped: {why.removeprefix('Skipped: ')}" if why else "skipped"
    return "pass" if rep.passed else "FAIL"


class Placeholders:
    """Replace run-specific strings (tmp paths, S3 prefixes, ports, pids) in recorded text."""

    def __init__(self):
        self.subs: list[tuple[str, str]] = []

    def add(self, value, name: str) -> None:
        self.subs.append((str(value), name))

    def __call__(self, text: str) -> str:
        for value, name in sorted(self.subs, key=lambda s: -len(s[0])):
            text = text.replace(value, name)
        text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/\s'\"]+", "<tmp>", text)
        text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", text)
        text = re.sub(r"\bpid \d+", "pid <pid>", text)
        text = re.sub(r"heartbeat \d+s ago", "heartbeat <n>s ago", text)
        text = re.sub(r"\.tmp-[0-9a-f]{32}", ".tmp-<hex>", text)
        return text


@pytest.fixture
def placeholders(tmp_path) -> Placeholders:
    p = Placeholders()
    p.add(tmp_path, "<tmp>")
    return p


@pytest.fixture
def fault_row(request, placeholders):
    """`fault_row(kind=, case=, fault=, seen=, exit=, recovery=)`: a row of this case (a test
    may record several; each gets the test's result). It returns the row: a case that may be
    skipped records kind, case and fault first and updates the rest once it ran, so a skipped
    case still has its row ("skipped: why"), never a silent gap in the table."""
    rows: list[dict] = []

    def record(**fields) -> dict:
        rows.append(fields)
        return fields

    yield record
    path = os.environ.get(ROWS_ENV)
    for row in rows:
        row = {"seen": "-", "exit": "-", "recovery": "-", **row}
        row = {k: placeholders(v) if isinstance(v, str) else v for k, v in row.items()}
        row["result"] = _result(request.node)
        row["test"] = request.node.nodeid
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")


def fault_env(fault: str | None = None, **extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("KDCACHE_FAULT", None)
    if fault:
        env["KDCACHE_FAULT"] = fault
    return env


_launcher: Launcher | None = None
_logs = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def _close_launcher():
    yield
    if _launcher is not None:
        _launcher.close()


def start_with_fault(args: list, fault: str | None, host: str | None = None, **env: str):
    """`kdcache ARGS` started in the background as its own process, with KDCACHE_FAULT=fault
    and, given `host`, calling itself that host name (what the store lock records: two
    processes on one machine stand in for two machines). Returns a Popen-like handle."""
    global _launcher
    if _launcher is None:
        _launcher = Launcher(fault_env())
    logs = os.path.join(_launcher.logs, str(next(_logs)))
    return _launcher.spawn([str(a) for a in args], fault_env(fault, **env), logs, host)


def run_with_fault(args: list, fault: str | None, timeout: float = 120, **env: str):
    """`kdcache ARGS` as its own process with KDCACHE_FAULT=fault, to its end."""
    child = start_with_fault(args, fault, **env)
    out, err = child.communicate(timeout)
    return subprocess.CompletedProcess(args, child.returncode, out, err)


def invoke(*args) -> None:
    """`kdcache ARGS` in this process, which must succeed (module-scoped references)."""
    from click.testing import CliRunner

    from kdcache.pipeline.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr


TERMINATED = "kdcache: terminated (SIGTERM); rerun the same command to resume"


def interrupt(args: list, fault: str):
    """Run with the fault and check the signal landed as it should: killed by SIGKILL, or for
    `...:TERM` exit 143 with the one "terminated" line and no traceback."""
    res = run_with_fault(args, fault)
    if fault.endswith(":TERM"):
        assert res.returncode == 143, res.stderr
        assert "Traceback" not in res.stderr and last_line(res.stderr) == TERMINATED, res.stderr
    else:
        assert res.returncode == -9, res.stderr  # the point was reached and the kill landed
    return res


def seen_after(res, left: str) -> str:
    """The table's "what the user sees" for an interrupted run that left `left` behind."""
    if res.returncode < 0:
        return f"the process dies; {left}"
    return f"{last_line(res.stderr)} ({left})"


def stopped(proc) -> bool:
    """True once `proc` has stopped itself (a KDCACHE_FAULT=...:STOP point)."""
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return False


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def exit_text(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else str(code)
