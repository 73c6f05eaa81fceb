"""Options declared once: name, type, default, help and the checks, in one place.

A stage's config dataclass declares each field with `option(...)`; a codec lists its own as
`Option`s. The CLI, the defaults, the help text and the validation are all derived from these
declarations (pipeline builds the click options from them), so an option is never stated twice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
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

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> None:
        """Raise UsageError naming the flag, the value and the fix; None passes (unset)."""
        if value is None:
            return
        if self.choices is not None and value not in self.choices:
            raise UsageError(
                f"{self.flag} {value!r}: use one of {', '.join(map(str, self.choices))}"
            )
        if self.type in (int, float) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value) and self.maximum is None:
                raise UsageError(f"{self.flag} {value}: must be a finite number")
            if self.minimum is not None and value < self.minimum:
                raise UsageError(f"{self.flag} {value} must be >= {_num(self.minimum)}")
            if self.above is not None and not value > self.above:
                raise UsageError(f"{self.flag} {value} must be > {_num(self.above)}")
            if self.maximum is not None and value > self.maximum:
                raise UsageError(f"{self.flag} {value} must be <= {_num(self.maximum)}")
        if self.check is not None and (problem := self.check(value)):
            raise UsageError(f"{self.flag} {value!r}: {problem}")


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
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = None
        kind = spec.get("type") or _field_type(f)
        out.append(Option(name=f.name, default=default, **(spec | {"type": kind})))
    return out


def _field_type(f: dataclasses.Field) -> type:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("dict", dict)):
        if text.startswith(name):
            return kind
    return str


def validate_options(cfg) -> None:
    """Run every declared field's checks on a config instance."""
    for opt in options_of(type(cfg)):
        opt.validate(getattr(cfg, opt.name))
