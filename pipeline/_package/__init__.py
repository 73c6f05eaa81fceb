"""kdcache: run a teacher once into a sharded cache, then train many students from it.

This file is the `kdcache` package itself. The three layers live in the repository's top-level
folders `storage/`, `stages/` and `pipeline/` (the design fixes that layout) and are installed
as `kdcache.storage`, `kdcache.stages` and `kdcache.pipeline` through the package-dir mapping in
pyproject.toml, so the wheel has one top-level import name and never shadows a user's own
`pipeline` or `storage` package.
"""

from importlib import metadata as _metadata

from kdcache.pipeline.hf_models import hf_causal_lm
from kdcache.pipeline.text_data import text_dataset

__all__ = ["hf_causal_lm", "text_dataset"]

try:
    __version__ = _metadata.version("kdcache")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
