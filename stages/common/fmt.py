"""How figures are written wherever a person reads them: the epoch log line and every report
section. A missing figure (None) is always "-"."""

from __future__ import annotations


def pct(v, digits: int = 1) -> str:
    """A fraction as a percentage: 0.9123 -> "91.2%"."""
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def num(v, spec: str = "g") -> str:
    """A number in the format `spec` of `format()` (".4f", ".3g", ...)."""
    return "-" if v is None else format(v, spec)


def signed(v, spec: str = "+.4f") -> str:
    return num(v, spec)


def seconds(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def ms(v) -> str:
    """Seconds as milliseconds."""
    return "-" if v is None else f"{1e3 * v:.3f} ms"


def nbytes(v) -> str:
    """A byte count in B, KiB, MiB or GiB."""
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.2f} {unit}"
        v /= 1024
    return "-"
