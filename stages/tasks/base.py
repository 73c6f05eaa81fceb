"""What a task is to the stages: the one interface behind `classification`, `regression` and
`causal-lm`, so that no stage asks which task it runs.

A task says how rows of a data set become model inputs, what a model's output is, which loss
terms its student learns from besides the codec's soft term, and how a student is measured on
labeled data and against the cached teacher. Each task is one module of this folder that
subclasses `Task` and registers itself (`kdcache.stages.tasks.register`); the stages look a task
up by the name a config or a store gives (`kdcache.stages.tasks.get`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from kdcache.stages.common.data import BatchView
from kdcache.storage.errors import UsageError

#: alpha (the soft term's weight) when none is given.
DEFAULT_ALPHA = 0.9


@dataclass(frozen=True)
class Measure:
    """How a measurement runs: where, in which precision, rows per forward, the memory bound of
    the logits made at once, a causal-lm student's fused head, and this rank's share."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    batch_size: int = 1024
    logits_mb: float = 256.0
    head: Any = None
    rank: int = 0
    world: int = 1
    # Sums a metric vector over the ranks (all_reduce in training; the identity alone).
    reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda s: s)


class Task:
    """The interface; each subclass sets the class attributes and implements the methods."""

    name: ClassVar[str]
    #: Rows are token blocks learned per token (loss means, metrics, positions).
    per_token: ClassVar[bool] = False
    #: Stage one's codec and T when none is given; `tempered` False: raw outputs, stored at T = 1.
    codec: ClassVar[str] = "topk"
    temperature: ClassVar[float] = 4.0
    tempered: ClassVar[bool] = True
    #: Evaluation rows per forward when none is given.
    eval_rows: ClassVar[int] = 1024
    # Cached rows the teacher-agreement figure reads (each epoch in training): a diagnostic, so
    # a causal LM's default is far fewer rows, each one a block of tokens.
    agree_rows: ClassVar[int] = 5000
    #: Seeded input augmentations (views) make sense for its inputs.
    augmentable: ClassVar[bool] = True
    #: A student learns only from a store (there are no hard labels without one).
    needs_cache: ClassVar[bool] = False
    #: The teacher's top-1 is a class a student can take as its hard label (--pseudo-labels).
    pseudo_labels: ClassVar[bool] = False
    #: Stage one stores the data's float targets beside the teacher's outputs.
    stores_targets: ClassVar[bool] = False
    #: The soft term is a distance to the teacher's stored values (not the codec's KL).
    soft_on_values: ClassVar[bool] = False
    #: The columns a run's epoch rows and summary add for this task (metrics.csv).
    row_fields: ClassVar[tuple[str, ...]] = ()
    #: The report's table of this task's runs (stages/report/: "students" is the classifier job's).
    report_table: ClassVar[str] = "students"
    #: The epoch a run calls best: (metric, +1 highest / -1 lowest).
    best: ClassVar[tuple[str, int]] = ("eval_accuracy", 1)

    # ------------------------------------------------------------------ rows, inputs, outputs

    def inputs(self, ds, ids: np.ndarray):
        """The model inputs of rows `ids` of `ds`."""
        raise NotImplementedError

    def logits(self, model, x) -> torch.Tensor:
        """The model's output on inputs `x`."""
        raise NotImplementedError

    def width(self, z: torch.Tensor, what: str) -> int:
        """The output width of a probe forward's output `z` (refusing an unusable shape)."""
        raise NotImplementedError

    def batch_view(self, ds, spec: str) -> torch.utils.data.Dataset:
        """Stage one's batches by ids: (sample ids, inputs, labels) (+ targets for regression)."""
        return BatchView(ds, spec, tokens=self.per_token)

    def teacher_outputs(self, z: torch.Tensor) -> torch.Tensor:
        """A non-sequence teacher's batch output as (B, C) rows."""
        return z

    def stored_labels(self, y: np.ndarray, ids: np.ndarray, width: int):
        """Stage one: a batch's (label column, targets (B, width) or None), checked."""
        return np.full(len(ids), -1, np.int64), None

    def label_rows(self, data, every_row: bool) -> tuple[np.ndarray, np.ndarray]:
        """(labels of every row, the ids a hard-label or online student trains on)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ settings

    def resolve(self, cfg, reader) -> dict:
        """The train settings this task fills or refuses given the cache (`reader`, or None)."""
        if cfg.normalize_targets:
            what = f"the cache {reader.url} holds no targets" if reader else "there is no --cache"
            raise UsageError(
                f"--normalize-targets divides by the stored targets' std, but {what}: drop it, "
                "or precompute a regression store from data with targets"
            )
        return {"alpha": DEFAULT_ALPHA if cfg.alpha is None else cfg.alpha}

    # ------------------------------------------------------------------ losses

    def hard_loss(self, z: torch.Tensor, batch: dict, weight=None) -> torch.Tensor:
        """The hard term on a batch whose tensors are on `z`'s device."""
        raise NotImplementedError

    def loss_weight(self, reader, cfg):
        """A per-output weight of the task's squared errors (regression's --normalize-targets)."""
        return None

    # ------------------------------------------------------------------ measuring

    def check_eval_data(self, ds, width: int, option: str = "--eval-data") -> None:
        """Refuse evaluation data that cannot measure this task (no labels, no targets)."""

    def eval_batches(self, ds, m: Measure, width: int, spec: str = "--eval-data") -> Iterator:
        """(inputs, references) over this rank's contiguous share of a data set."""
        raise NotImplementedError

    def teacher_rows(self, reader, data, rows: int):
        """The first `rows` cached rows and the teacher's reference on them: an object whose
        `batches(batch_size, rank, world)` yields (inputs, references)."""
        raise NotImplementedError

    def measure(self, model, batches, m: Measure, width: int) -> dict:
        """This task's metrics of `model` over (inputs, references) batches, summed over ranks."""
        raise NotImplementedError

    def epoch_metrics(self, model, eval_data, rows, m: Measure, width: int) -> dict:
        """The metrics of a training epoch row: on `eval_data` and against `rows` (each None
        when absent); every key of `row_fields` is present."""
        raise NotImplementedError

    def evaluate(self, model, ds, rows, m: Measure, width: int) -> dict:
        """`kdcache evaluate`'s figures: on `ds` (option --data) and against `rows` when given."""
        raise NotImplementedError

    def scores(self, row: dict) -> str:
        """The measured part of an epoch's log line."""
        raise NotImplementedError
