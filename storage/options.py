"""Options declared once: name, type, default, help and the checks, in one place.

A stage's config dataclass declares each field with `option(...)`; a codec lists its own as
`Option`s. The CLI, the defaults, the help text and the validation are all derived from these
declarations (pipeline builds the click options from them), so an option is never stated twice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

from kdcache.storage.errors import UsageError

_MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Option:
    """One user-facing setting. `check(value)` returns an error text (what is wrong and the fix)
    or None; the simple bounds cover most options without one."""

    name: str
    type: type = str
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    minimum: float | None = None  # value >= minimum
    above: float | None = None  # value > above
    maximum: float | None = None  # value <= maximum
    check: Callable[[Any], str | None] | None = None
    cli: bool = True
    execution: bool = False  # changes speed or logging only, never what a run computes
    below: float | None = None  # value < below
    flag_name: str | None = None  # when the flag is not --name-with-dashes
    required: bool = False  # no default: the command line or --config must give it
    collects: bool = False  # a dict field that receives the command's extra (codec) options

    @property
    def flag(self) -> str:
        """How the user sets it: the flag, or for a config-file-only setting its key."""
        if self.flag_name or not self.cli:
            return self.flag_name or self.name
        return "--" + self.name.replace("_", "-")

    def bounds(self) -> str | None:
        """The allowed range in words: '>= 1', '> 0', 'in [0, 1)'; None when unbounded."""
        lo = _edge((">=", "[", self.minimum), (">", "(", self.above))
        hi = _edge(("<=", "]", self.maximum), ("<", ")", self.below))
        if lo and hi:
            return f"in {lo[1]}{_num(lo[2])}, {_num(hi[2])}{hi[1]}"
        edge = lo or hi
        return f"{edge[0]} {_num(edge[2])}" if edge else None

    def validate(self, value: Any) -> None:
        """Raise UsageError naming the flag, the value and the fix; None passes (unset)."""
        if value is None:
            return
        if self.choices is not None and value not in self.choices:
            raise UsageError(
                f"{self.flag} {value!r}: use one of {', '.join(map(str, self.choices))}"
            )
        if self.type in (int, float):
            kinds = (int,) if self.type is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise UsageError(f"{self.flag} {value!r}: must be a number ({self.type.__name__})")
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{self.flag} {value}: must be a finite number")
            if not _within(value, self):
                raise UsageError(f"{self.flag} {value} must be {self.bounds()}")
        if self.check is not None and (problem := self.check(value)):
            raise UsageError(f"{self.flag} {value!r}: {problem}")


def _edge(*candidates: tuple) -> tuple | None:
    return next((c for c in candidates if c[2] is not None), None)


def _within(x: float, o: Option) -> bool:
    return (
        (o.minimum is None or x >= o.minimum)
        and (o.above is None or x > o.above)
        and (o.maximum is None or x <= o.maximum)
        and (o.below is None or x < o.below)
    )


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def option(default: Any = _MISSING, help: str = "", **kw) -> Any:
    """A dataclass field carrying its `Option` (the name is filled in from the field)."""
    factory = _MISSING
    if isinstance(default, dict | list):
        factory, default = (lambda d=default: type(d)(d)), _MISSING
    meta = {"option": kw | {"help": help}}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def options_of(cls) -> list[Option]:
    """The `Option` of every declared field of a config dataclass, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is None:
            continue
        required = False
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default, required = None, True
        kind = spec.get("type") or _field_type(f)
        out.append(
            Option(name=f.name, default=default, required=required, **(spec | {"type": kind}))
        )
    return out


def _field_type(f: dataclasses.Field) -> type:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("dict", dict)):
        if text.startswith(name):
            return kind
    return str


def option_problems(cfg, skip: Iterable[str] = ()) -> list[str]:
    """Every declared field's failed check on a config instance (but those named in `skip`),
    one message each: a config is checked whole, not up to its first mistake."""
    problems = []
    for opt in options_of(type(cfg)):
        if opt.name not in skip:
            try:
                opt.validate(getattr(cfg, opt.name))
            except UsageError as exc:
                problems.append(str(exc))
    return problems


def raise_problems(problems: list[str]) -> None:
    """One UsageError (one line) naming every problem, numbered when there are several."""
    if len(problems) == 1:
        raise UsageError(problems[0])
    if problems:
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise UsageError(f"{len(problems)} problems with the settings: {listed}")


def validate_options(cfg, skip: Iterable[str] = ()) -> None:
    """Run every declared field's checks on a config instance (but those named in `skip`)."""
    raise_problems(option_problems(cfg, skip))
