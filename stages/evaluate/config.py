"""The settings of `kdcache evaluate` and `kdcache inspect`."""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.stages import tasks
from kdcache.stages.common.config import (
    DEVICE_HELP,
    EVAL_LOGITS_HELP,
    STORAGE_HELP,
    TRAIN_PRECISIONS,
    Checked,
    verify_reads_option,
)
from kdcache.stages.tasks.scoring import EVAL_LOGITS_MB
from kdcache.storage.options import option


@dataclass(kw_only=True, frozen=True)
class EvaluateConfig(Checked):
    checkpoint: str = option(
        help="A finished `kdcache train --out` folder, or a model.pt / checkpoint-N.pt file (URL)."
    )
    # A bare weights file does not say what it is: the model spec comes with it.
    student: str | None = option(
        None, "With a model.pt file: the student spec (a checkpoint-N.pt names its own)."
    )
    student_args: dict = option(
        {}, "k=v keyword for --student (repeatable).", flag_name="--student-arg"
    )
    task: str | None = option(
        None,
        "With a model.pt file: its task (default: a checkpoint's own, else classification).",
        choices=tuple(t.name for t in tasks.every() if not t.needs_cache),
    )
    deploy: bool = option(
        False, "Also parameters, weight bytes, CPU latency (batch 1, 256) and the int8 copy's."
    )
    data: str = option(help="Labeled data set to evaluate on.")
    data_args: dict = option(
        {}, "k=v keyword for the data set (repeatable).", flag_name="--data-arg"
    )
    cache: str | None = option(None, "Also report agreement with this cache's teacher top-1.")
    batch_size: int | None = option(
        None, "Evaluation rows per forward (default 1024; 64 blocks for causal-lm).", minimum=1
    )
    eval_logits_mb: float = option(EVAL_LOGITS_MB, EVAL_LOGITS_HELP, above=0)
    device: str = option("auto", DEVICE_HELP, execution=True)
    precision: str = option("fp32", "Autocast precision.", choices=TRAIN_PRECISIONS)
    agree_rows: int | None = option(
        None,
        "Cached rows measured for teacher agreement (default 5000; 512 blocks for causal-lm).",
        minimum=1,
    )
    ignore_fingerprint: bool = option(False, "Skip the cache data check.", execution=True)
    storage_options: dict = option({}, STORAGE_HELP, flag_name="--storage-option", execution=True)
    verify_reads: bool = verify_reads_option()


@dataclass(kw_only=True, frozen=True)
class InspectConfig(Checked):
    deep: bool = option(
        False, "Also read every row and feature (each file checked) and count non-finite values."
    )
    verify_reads: bool = verify_reads_option()
    storage_options: dict = option({}, STORAGE_HELP, flag_name="--storage-option", execution=True)
