"""The tasks, found by name like the codecs: a config's or a store's ``task`` picks one.

Each built-in task is one module of this folder (`classification`, `regression`, `causal_lm`)
whose `Task` subclass registers itself here; a third-party package adds one by exposing a module
in the ``kdcache.tasks`` entry-point group that calls `register`. Nothing outside these modules
compares a task's name (tests/test_layers.py holds that): the stages ask the task object instead.
"""

from __future__ import annotations

from importlib import import_module, metadata

from kdcache.storage.errors import UsageError

#: A config or a store that names no task.
DEFAULT = "classification"

_REGISTRY: dict = {}
_LOADED = False
_BUILT_IN = ("classification", "regression", "causal_lm")


def register(cls):
    """Class decorator: make a `Task` subclass available under its ``name`` (one instance)."""
    _REGISTRY[cls.name] = cls()
    return cls


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for module in _BUILT_IN:
        import_module(f"{__name__}.{module}")
    for ep in metadata.entry_points(group="kdcache.tasks"):
        ep.load()


def names() -> tuple[str, ...]:
    _load()
    return tuple(_REGISTRY)


def every():
    """Every registered task object, in registration order."""
    _load()
    return tuple(_REGISTRY.values())


def get(name: str | None):
    """The task registered as `name` (None: the default); one line naming the known ones else."""
    _load()
    try:
        return _REGISTRY[name or DEFAULT]
    except KeyError:
        raise UsageError(
            f"unknown task {name!r}: this kdcache knows {', '.join(_REGISTRY)}"
        ) from None
