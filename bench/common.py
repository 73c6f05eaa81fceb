"""Shared helpers for the benchmarks: timing, result tables, and the JSON a bench hands run_all.

Every bench script is a plain program (`python -m bench.bench_x [--quick] [--json PATH]`) that
prints its tables and, with `--json`, writes them for `bench/run_all.py` to collect. Speed targets
are ratios measured side by side in one run, never asserted: a shared 2-core machine is too noisy
for absolute thresholds, so contenders are timed interleaved (A, B, A, B, ...) and compared by
their medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


def interleaved(
    contenders: dict[str, Callable[[], object]],
    repeat: int = 3,
    warmup: int = 1,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each contender, run round-robin so machine noise hits all alike.

    With `cpu` (a dict), also records each call's process CPU seconds (every thread of this
    process): a measure of work done that other processes on the machine barely disturb.
    """
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            c = time.process_time()
            out[name].append(timed(fn)[0])
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - c)
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def fmt(value) -> str:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)


class Table:
    """A titled result table; rows hold raw numbers, formatting happens only when printed."""

    def __init__(self, title: str, headers: list[str]):
        self.title = title
        self.headers = headers
        self.rows: list[list] = []

    def add(self, *row) -> None:
        if len(row) != len(self.headers):
            raise ValueError(f"row {row} does not match headers {self.headers}")
        self.rows.append(list(row))

    def markdown(self) -> str:
        cells = [self.headers] + [[fmt(v) for v in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.headers))]

        def line(r: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([f"### {self.title}", "", line(cells[0]), sep, *map(line, cells[1:])])

    def to_json(self) -> dict:
        return {"title": self.title, "headers": self.headers, "rows": self.rows}


class Report:
    """What one bench produced: tables, headline ratios against their targets, and notes."""

    def __init__(self, name: str, quick: bool):
        self.name = name
        self.quick = quick
        self.tables: list[Table] = []
        self.targets: list[dict] = []
        self.notes: list[str] = []

    def table(self, title: str, headers: list[str]) -> Table:
        t = Table(title, headers)
        self.tables.append(t)
        return t

    def target(self, what: str, value: float, op: str, goal: float) -> None:
        met = value <= goal if op == "<=" else value >= goal
        self.targets.append({"what": what, "value": value, "op": op, "goal": goal, "met": met})

    def note(self, text: str) -> None:
        self.notes.append(text)

    def markdown(self) -> str:
        parts = [f"## {self.name}" + (" (quick)" if self.quick else "")]
        parts += [t.markdown() for t in self.tables]
        if self.targets:
            t = Table("targets", ["ratio", "measured", "target", "met"])
            for g in self.targets:
                t.add(g["what"], g["value"], f"{g['op']} {g['goal']}", "yes" if g["met"] else "NO")
            parts.append(t.markdown())
        parts += [f"- {n}" for n in self.notes]
        return "\n\n".join(parts) + "\n"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "quick": self.quick,
            "tables": [t.to_json() for t in self.tables],
            "targets": self.targets,
            "notes": self.notes,
        }

    def finish(self, args, work: Path) -> Report:
        """The environment note, `work` deleted unless the caller chose it, then `emit`."""
        self.note(f"environment: {environment()}")
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        self.emit(args.json)
        return self

    def emit(self, json_path: str | None) -> None:
        if (warning := busy_note()) is not None:
            self.note(warning)
        print(self.markdown(), flush=True)
        if json_path:
            Path(json_path).write_text(json.dumps(self.to_json(), indent=2))


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def busy_note() -> str | None:
    """A warning when other processes load the machine: then ratios can be far off.

    A busy 2-core box hurts torch's OpenMP threads most (they spin-wait for each other), so a
    bare multi-threaded loop can slow down 10x while a contender with other threads does not.
    """
    if not hasattr(os, "getloadavg"):
        return None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cpus:
        return None
    return (
        f"WARNING: the machine was busy (load average {load:.1f} on {cpus} CPUs at the end of this "
        "bench): timings, and ratios between multi-threaded contenders, are unreliable; rerun on "
        "an idle machine"
    )


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    p.add_argument("--tiny", action="store_true", help="smallest sizes (tests only)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    p.add_argument("--repeat", type=int, default=None, help="timed repetitions per contender")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    args.quick = args.quick or args.tiny
    return args
