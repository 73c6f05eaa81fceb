"""Training checkpoints: what `checkpoint-N.pt` holds and how a run resumes from it.

After every epoch rank 0 saves the student, projector, optimizer, scheduler and every RNG state
(torch, CUDA, numpy, python) with the metrics rows so far; only the last KEEP_CHECKPOINTS stay.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from kdcache.storage import faults

KEEP_CHECKPOINTS = 2


def rng_state() -> dict:
    """Every global RNG a training step may draw from (numpy's keys as a tensor: weights_only)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(rng["python"])


def save(folder, epoch: int, parts: dict, rows: list, settings: dict, extra: dict) -> None:
    """checkpoint-{epoch}.pt from `parts` (name -> object with state_dict), then metrics.csv,
    then the checkpoints older than the last KEEP_CHECKPOINTS are removed."""
    state = {name: obj.state_dict() for name, obj in parts.items()}
    state.update(rng=rng_state(), epoch=epoch, rows=rows, settings=settings, extra=extra)
    folder.write_checkpoint(epoch, state)
    faults.point("checkpoint.saved")
    folder.write_rows(rows)
    folder.prune_checkpoints(epoch - KEEP_CHECKPOINTS)
    faults.point("checkpoint.pruned")


def latest(folder) -> dict | None:
    """The newest checkpoint's contents, or None when there is none."""
    epochs = folder.checkpoint_epochs()
    return folder.read_checkpoint(epochs[-1]) if epochs else None


def restore(state: dict, parts: dict) -> None:
    """Load every part's state and the RNG states saved with them."""
    for name, obj in parts.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"])
