"""Building a data set from its --data spec (the helpers that use one live in stages/common/data.py)."""

from __future__ import annotations

from kdcache.pipeline.specs import build
from kdcache.storage.errors import UsageError


def load_dataset(spec: str, kwargs: dict):
    ds = build(spec, kwargs, what="--data")
    if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
        raise UsageError(
            f"--data {spec!r} built a {type(ds).__name__}, which is not a map-style dataset "
            "(it needs __len__ and __getitem__): name a class or factory that returns one"
        )
    if len(ds) == 0:
        raise UsageError(
            f"--data {spec!r} with {kwargs} is empty: nothing to compute; check its arguments "
            "(--data-arg)"
        )
    return ds
