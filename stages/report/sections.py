"""The report's sections besides the classifier job's own (stages/report/run.py), found in order
like the codecs and the tasks: each is one module that registers a `Section`.

A section collects its part of report.json from the runs (`collect(cfg, build, runs)`: `runs` are
the finished runs of RUNS/students whose task reports them in its table, `Task.report_table`;
None leaves the section out), writes its markdown (`markdown(part)`: report.md's lines) and its
terminal summary (`terminal(part)`: a table and one line for `kdcache report`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

_SECTIONS: dict = {}
_BUILT_IN = ("regression", "lm")


@dataclass(frozen=True)
class Section:
    key: str  # report.json's key, and the `Task.report_table` of the runs it takes
    collect: Callable
    markdown: Callable[[dict], list[str]]
    terminal: Callable[[dict], tuple[str, str]]


def register(section: Section) -> Section:
    _SECTIONS[section.key] = section
    return section


def every() -> tuple[Section, ...]:
    for name in _BUILT_IN:
        import_module(f"{__package__}.{name}")
    return tuple(_SECTIONS.values())
