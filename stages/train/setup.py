"""What a student's run is built from before it trains: the student + projector module, the LR
schedule, the settings a run records (and whether an identical run already finished), and the
two-row probe of a model's output and feature widths. stages/train/trainer.py trains with them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from kdcache.stages import tasks
from kdcache.stages.common import views
from kdcache.stages.common.device import to_device
from kdcache.stages.common.hooks import FeatureTap
from kdcache.stages.train.config import EXECUTION, TrainConfig, cached_only
from kdcache.stages.train.run_folder import RunFolder
from kdcache.storage.errors import UsageError
from kdcache.storage.manifest import diff
from kdcache.storage.options import options_of, raise_problems
from kdcache.storage.reader import CacheReader


class Distillee(nn.Module):
    """Student plus feature projector: one module, so DDP syncs both and one optimizer trains both."""

    def __init__(self, student, tap: FeatureTap | None, projector: nn.Module, task, project=True,
                 head=None):  # fmt: skip
        super().__init__()
        self.student, self.projector, self.tap, self.task = student, projector, tap, task
        self.project = project  # False: the tap feeds relation losses only (--beta 0)
        # A fused head (stages/tasks/lm_head.py): the forward stops at the last hidden states and the
        # loss applies the head chunk by chunk. Called here, so DDP sees the whole forward.
        self.head = head

    def forward(self, x):
        if self.tap is not None and isinstance(x, dict):
            self.tap.mask = x["attention_mask"]
        z = self.head.hidden(x) if self.head is not None else self.task.logits(self.student, x)
        if self.tap is None or not self.project:
            return z, None
        f = self.tap.value
        return z, self.projector(f.reshape(len(f), -1))


def schedule(total: int, warmup: float):
    """LR factor per step: linear warmup over `warmup * total` steps, then cosine to zero."""
    warm = int(warmup * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


DEFAULTS = {o.name: o.default for o in options_of(TrainConfig)}


def settings_diff(old: dict, new: dict) -> list[str]:
    # A setting added after `old` was recorded counts at its default: old runs stay finished.
    old = {k: DEFAULTS[k] for k in new if k not in old and k in DEFAULTS} | old
    keep = lambda d: {k: v for k, v in d.items() if k not in EXECUTION}  # noqa: E731
    return diff(keep(old), keep(new))


def probe(model, data, tap, device, task, what="--student") -> tuple[int, int | None]:
    """(output width, pooled feature width) from a two-row forward, in eval mode (BN untouched);
    a causal-lm model's width is its vocabulary."""
    x = task.inputs(data, np.arange(min(2, len(data))))
    model.eval()
    with torch.no_grad():
        z = task.logits(model, to_device(x, device))
    dim = None if tap is None or tap.value is None else int(tap.value[0].numel())
    return task.width(z, what), dim


def resolve(cfg: TrainConfig, reader: CacheReader | None) -> TrainConfig:
    """The run's settings: `cfg` checked (every problem at once) against the cache too, with the
    defaults the cache and the task give filled in; a new config, the same on every rank (each
    builds it from the same config and store). The settings a run records are `asdict` of it."""
    cfg = cfg.resolved()
    problems = []
    if reader and cfg.task not in (None, reader.task):
        problems.append(
            f"--task {cfg.task} but the cache {reader.url} holds a {reader.task} teacher: "
            "drop --task (a cache's task is the store's)"
        )
    name = reader.task if reader else cfg.task or tasks.DEFAULT
    task = tasks.get(name)
    problems += cached_only(cfg, reader)
    if reader and cfg.beta > 0 and not reader.has_features:
        problems.append(
            f"--beta {cfg.beta} needs teacher features but the cache {reader.url} stores none: "
            "recompute it with `kdcache precompute --features LAYER`, or use --beta 0"
        )
    fills = {"task": name}
    for step in (lambda: task.resolve(cfg, reader), lambda: views.settle(cfg, reader)):
        try:
            fills |= step()
        except UsageError as exc:
            problems.append(str(exc))
    raise_problems(problems)
    if cfg.temperature is None and (reader or cfg.online):
        fills["temperature"] = reader.temperature if reader else task.temperature
    return dataclasses.replace(cfg, **fills)


def run_settings(cfg: TrainConfig, reader: CacheReader | None) -> dict:
    """The settings a run records: its resolved config as a dict."""
    return asdict(resolve(cfg, reader))


def finished(cfg: TrainConfig, folder: RunFolder) -> dict | None:
    """The summary of a finished run with the resolved settings `cfg`, if there is one (then
    this run is a no-op)."""
    settings = asdict(cfg)
    summary = folder.summary()
    if summary is None:
        return None
    changes = settings_diff(summary.get("settings", {}), settings)
    if changes:
        raise UsageError(
            f"{cfg.out} holds a finished run with other settings ({'; '.join(changes)}): "
            "use another --out, or delete that folder to retrain"
        )
    return summary
