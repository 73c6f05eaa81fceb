"""The soft-label codecs, found by name: the manifest's ``soft_labels.codec`` picks one.

Built-in codecs register themselves when this package is imported; a third-party package adds
one by exposing a module in the ``kdcache.codecs`` entry-point group that calls `register`.
"""

from __future__ import annotations

from importlib import metadata

from kdcache.storage.errors import FormatError

_REGISTRY: dict = {}
_PLUGINS_LOADED = False


def register(cls):
    """Class decorator: make a `Codec` subclass available under its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in metadata.entry_points(group="kdcache.codecs"):
        ep.load()


def names() -> tuple[str, ...]:
    _load_plugins()
    return tuple(_REGISTRY)


def codec_class(name: str):
    """The codec registered as `name`; FormatError names the known ones otherwise."""
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FormatError(
            f"unknown soft-label codec {name!r}; this kdcache knows {', '.join(sorted(_REGISTRY))}"
        ) from None


def open_codec(soft_labels: dict, task: str = "classification"):
    """The codec object of a manifest's (or run header's) ``soft_labels``."""
    return codec_class(soft_labels["codec"])(soft_labels, task)


def all_options() -> list:
    """Every codec's declared options, once each (for the precompute command's flags)."""
    seen: dict = {}
    for name in names():
        for opt in _REGISTRY[name].options:
            seen.setdefault(opt.name, opt)
    return list(seen.values())


# Built-ins register on import; they import `register` from here, hence at the end.
from kdcache.storage.codecs import dense, sampled, topk  # noqa: E402, F401
