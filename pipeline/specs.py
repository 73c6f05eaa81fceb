"""`package.module:attr` specs, `k=v` arguments and config files: how users name their code."""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from kdcache.storage.errors import UsageError


def resolve(spec: str, what: str = "spec") -> Any:
    """Import `package.module:attr` (dots after the colon walk attributes)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"{what} {spec!r} is not of the form package.module:attr, "
            "e.g. kdcache.pipeline.examples.models:TeacherCNN"
        )
    # Like `python -m`, let a spec name code in the current folder without a PYTHONPATH, and
    # first: the `kdcache` script must resolve the same module as its `python -c` children.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(
            f"{what} {spec!r}: cannot import {module_name!r} ({exc}); "
            "check the spelling and that the package is installed or on PYTHONPATH"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(
                f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}; check the name "
                "after the colon"
            ) from None
    return obj


def build(spec: str, kwargs: dict, what: str = "spec") -> Any:
    """Resolve a spec and call it with kwargs (a class or a factory function)."""
    target = resolve(spec, what)
    if not callable(target):
        if kwargs:
            raise UsageError(f"{what} {spec!r} is not callable, so it takes no arguments")
        return target
    try:
        return target(**kwargs)
    except TypeError as exc:
        raise UsageError(f"{what} {spec!r} rejected its arguments {kwargs}: {exc}") from None


def augmentation(spec: str | None, kwargs: dict, what: str = "--augment"):
    """The callable `augment(x, generator)` a spec names: a class is built with the kwargs
    (its instances are called), a function gets them bound as keywords. A function's optional
    `batch(x, generators, **kwargs)` attribute (the same views of a whole batch, faster) is bound
    the same way."""
    if spec is None:
        return None
    target = resolve(spec, what)
    if isinstance(target, type):
        return build(spec, kwargs, what)
    if not callable(target):
        raise UsageError(f"{what} {spec!r} is a {type(target).__name__}, not a callable")
    augment = functools.partial(target, **kwargs)
    if callable(getattr(target, "batch", None)):
        augment.batch = functools.partial(target.batch, **kwargs)
    return augment


def parse_value(text: str) -> Any:
    """CLI values: JSON when they parse as JSON (numbers, true, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_kv(pairs: tuple[str, ...] | list[str], option: str) -> dict:
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {pair!r} is not key=value: write {option} KEY=VALUE")
        out[key.strip()] = parse_value(value)
    return out


def load_config(path: str | None) -> dict:
    """A TOML job file; every CLI option can live there (dashes or underscores both work)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path!r} does not exist; check the path")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path!r} is not valid TOML: {exc}") from None
    return normalise_keys(doc)


def normalise_keys(doc: dict) -> dict:
    return {k.replace("-", "_"): v for k, v in doc.items()}


def merge_options(defaults: dict, config: dict, cli: dict) -> dict:
    """CLI beats config file beats defaults; unknown config keys are refused, not ignored."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        close = {k: difflib.get_close_matches(k, list(defaults), n=1) for k in unknown}
        hint = "; ".join(f"{k!r} -> {c[0]!r}" for k, c in close.items() if c)
        raise UsageError(
            f"config has unknown option(s) {unknown}"
            + (f"; did you mean {hint}?" if hint else "")
            + f" (known: {', '.join(sorted(defaults))})"
        )
    out = dict(defaults)
    out.update(config)
    out.update({k: v for k, v in cli.items() if v is not None and v != ()})
    return out
