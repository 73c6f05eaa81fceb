"""MNIST-1D as a map-style dataset with an unlabeled transfer split.

The data is always generated locally with ``mnist1d.data.make_dataset`` (the package's download
path is never used: there is no network at run time) and cached on disk as ``.npz`` keyed by a
hash of the generation arguments, so only the first construction pays the generation cost.

Splits:

- ``"train"``: the standard 4,000 labeled samples (``get_dataset_args()`` defaults, seed 42).
- ``"test"``: the standard 1,000 held-out samples of the same generation.
- ``"transfer"``: ``num_transfer`` fresh samples from another seed (default 1), unlabeled.
- ``"train+transfer"``: the 4,000 labeled train rows first, then the transfer rows unlabeled.

``seed`` overrides the generation seed of the split (42 for train/test, 1 for transfer). For
``"train+transfer"`` it overrides the transfer seed only: the labeled rows stay the standard train
set so they are exactly the rows the teacher was fitted on. A transfer seed equal to the train
seed regenerates near-copies of the train samples (same RNG stream per class), so avoid 42 there.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import threading
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

SPLITS = ("train", "test", "transfer", "train+transfer")
TRAIN_SEED = 42
TRANSFER_SEED = 1
NUM_FEATURES = 40
# Bumped whenever the on-disk layout changes so stale files are never misread.
_CACHE_FORMAT = 1
# make_dataset draws from the process-global RNGs, so two threads generating at once would
# interleave their streams and cache corrupted data; processes are isolated and need no lock.
_GENERATE_LOCK = threading.Lock()


def default_cache_dir(cache_dir: str | os.PathLike | None = None, name: str = "mnist1d") -> Path:
    """Resolve the cache directory: argument, then ``$KDCACHE_DATA_DIR``, then ~/.cache."""
    if cache_dir is None:
        cache_dir = os.environ.get("KDCACHE_DATA_DIR") or f"~/.cache/kdcache/{name}"
    return Path(cache_dir).expanduser()


def atomic_write(path: Path, write) -> None:
    """`write(file)` into a unique temp file beside `path`, then rename: concurrent runs each
    produce a complete file and the last rename wins, so readers never see a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shared cache dir needs readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# MNIST-1D's standard generation settings (`mnist1d.data.get_dataset_args()`, without the URL of
# its download path, which we never take), written out so that finding a cached split needs no
# import of `mnist1d`: it pulls in scipy and matplotlib, 2.5 s that a cache hit should not pay.
# tests/pipeline/test_examples.py checks that they still equal the package's defaults.
STANDARD_ARGS = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 0.02,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}


def _generation_args(seed: int, num_samples: int, train_split: float) -> dict:
    args = json.loads(json.dumps(STANDARD_ARGS))  # a deep copy
    args.update(seed=int(seed), num_samples=int(num_samples), train_split=float(train_split))
    return args


def _cache_path(args: dict, cache_dir: Path) -> Path:
    try:
        version = metadata.version("mnist1d")
    except metadata.PackageNotFoundError:
        version = "unknown"
    # The package version is part of the key because a new generator may yield different data.
    key = json.dumps({"args": args, "mnist1d": version, "format": _CACHE_FORMAT}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir / f"mnist1d_s{args['seed']}_n{args['num_samples']}_{digest}.npz"


def _generate(args: dict) -> dict[str, np.ndarray]:
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    # make_dataset reseeds the global `random` and `np.random` generators; restore them so that
    # building a dataset never changes the randomness of the caller (e.g. a seeded trainer).
    with _GENERATE_LOCK:
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            data = make_dataset(ObjectView(dict(args)))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32).reshape(-1, NUM_FEATURES),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def load_or_generate(
    seed: int, num_samples: int, train_split: float, cache_dir: Path
) -> dict[str, np.ndarray]:
    """Return the arrays of one ``make_dataset`` call, generating them at most once per cache."""
    args = _generation_args(seed, num_samples, train_split)
    path = _cache_path(args, cache_dir)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable (e.g. truncated by a full disk): regenerate and overwrite below
    arrays = _generate(args)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return arrays


class MNIST1D(Dataset):
    """MNIST-1D split; labeled rows yield ``(x, y)``, unlabeled rows yield ``{"input": x}``."""

    num_classes = 10

    def __init__(
        self,
        split: str = "train",
        seed: int | None = None,
        num_transfer: int = 30000,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.split = split
        root = default_cache_dir(cache_dir)
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []

        if split in ("train", "test", "train+transfer"):
            train_seed = TRAIN_SEED if seed is None or split == "train+transfer" else seed
            std = load_or_generate(train_seed, 5000, 0.8, root)
            key = "_test" if split == "test" else ""
            xs.append(std["x" + key])
            ys.append(std["y" + key])

        if split in ("transfer", "train+transfer"):
            if num_transfer <= 0:
                raise ValueError(f"num_transfer must be positive, got {num_transfer}")
            transfer_seed = TRANSFER_SEED if seed is None else seed
            # make_dataset emits num_samples // 10 per class, so round up to a multiple of 10
            # and keep everything in the "train" part; the shuffle makes the cut class-balanced
            # in expectation.
            n_gen = -(-num_transfer // self.num_classes) * self.num_classes
            fresh = load_or_generate(transfer_seed, n_gen, 1.0, root)
            xs.append(fresh["x"][:num_transfer])
            ys.append(np.full(num_transfer, -1, dtype=np.int64))

        self._x = np.ascontiguousarray(np.concatenate(xs), dtype=np.float32)
        self._y = np.ascontiguousarray(np.concatenate(ys), dtype=np.int64)
        # Read-only so the views handed out by `inputs`/`labels` cannot corrupt the dataset.
        self._x.flags.writeable = False
        self._y.flags.writeable = False

    @property
    def inputs(self) -> np.ndarray:
        """All inputs, read-only ``(N, 40)`` float32."""
        return self._x

    @property
    def labels(self) -> np.ndarray:
        """All labels, read-only ``(N,)`` int64 with -1 for unlabeled rows."""
        return self._y

    def __len__(self) -> int:
        return len(self._y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | dict[str, torch.Tensor]:
        x = torch.tensor(self._x[i])
        y = int(self._y[i])
        return {"input": x} if y < 0 else (x, y)

    def get_batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Vectorised ``__getitem__``: ``{"input": (n, 40) float32, "label": (n,) int64}``."""
        ids = np.asarray(ids, dtype=np.int64)
        return {"input": self._x[ids], "label": self._y[ids]}

    def __repr__(self) -> str:
        labeled = int((self._y >= 0).sum())
        return f"MNIST1D(split={self.split!r}, n={len(self)}, labeled={labeled})"
