"""kdcache: run a teacher once into a sharded cache, then train many students from it.

This file is the `kdcache` package itself. The three layers live in the repository's top-level
folders `storage/`, `stages/` and `pipeline/` (the design fixes that layout) and are installed
as `kdcache.storage`, `kdcache.stages` and `kdcache.pipeline` through the package-dir mapping in
pyproject.toml, so the wheel has one top-level import name and never shadows a user's own
`pipeline` or `storage` package.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("kdcache")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from kdcache.pipeline.hf_models import hf_causal_lm  # noqa: E402
from kdcache.pipeline.text_data import text_dataset  # noqa: E402
from kdcache.stages.api.cache import Cache, CacheDataset, open_cache  # noqa: E402
from kdcache.stages.api.kd_loss import kd_loss, kd_loss_fused  # noqa: E402

__all__ = [
    "Cache",
    "CacheDataset",
    "KDTrainer",
    "hf_causal_lm",
    "kd_loss",
    "kd_loss_fused",
    "open_cache",
    "text_dataset",
]


def __getattr__(name: str):
    # transformers is the optional `lm` extra: imported only when KDTrainer is first named.
    if name == "KDTrainer":
        from kdcache.stages.api.hf_trainer import KDTrainer

        return KDTrainer
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
