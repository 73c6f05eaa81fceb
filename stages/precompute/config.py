"""Stage one's settings (`kdcache precompute`), each declared once: its flag, help, TOML key and
check follow from the declaration (stages/common/config.py says how a config is checked)."""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.stages import tasks
from kdcache.stages.common.config import (
    AUGMENT_ARG_HELP,
    AUGMENT_HELP,
    DEVICE_HELP,
    DTYPES,
    QUIET_HELP,
    STORAGE_HELP,
    Checked,
    augment_problems,
)
from kdcache.stages.common.hooks import POOLS
from kdcache.storage import codecs
from kdcache.storage.errors import UsageError
from kdcache.storage.options import option, option_problems


@dataclass(kw_only=True, frozen=True)
class PrecomputeConfig(Checked):
    teacher: str | None = option(None, "Teacher spec package.module:attr (class or factory).")
    checkpoint: str | None = option(
        None, "State dict, TorchScript or torch.export file (path or URL)."
    )
    teacher_args: dict = option(
        {}, "k=v keyword for the teacher (repeatable).", flag_name="--teacher-arg"
    )
    data: str = option(help="Data set spec package.module:attr (map-style, class or factory).")
    data_args: dict = option(
        {}, "k=v keyword for the data set (repeatable).", flag_name="--data-arg"
    )
    out: str = option(help="Store URL: a folder, memory://..., s3://bucket/prefix, ...")
    temperature: float | None = option(
        None, "Soft-label temperature T, soft labels are z/T (default 4; 1 for causal-lm).", above=0
    )
    codec: str | None = option(
        None,
        "Soft-label codec (default topk; dense for regression; sampled for causal-lm).",
        choices=codecs.names(),
    )
    budget_bytes_per_token: float | None = option(
        None,
        "Choose the codec's size (topk's k, sampled's draws) to fit this many bytes per token "
        "of its columns as stored (compressed file bytes), measured on the first batch.",
        above=0,
    )
    dtype: str = option("float16", "Logit storage dtype.", choices=DTYPES)
    features: str | None = option(
        None, "Teacher submodule (named_modules name) whose output to store."
    )
    pool: str = option("avg", "Feature pooling.", choices=POOLS)
    feature_dtype: str = option("float16", "Feature dtype.", choices=DTYPES)
    # Pooled float features barely compress (12% on MNIST-1D's teacher with zstd) but zstd halves
    # the reader's feature throughput, so chunks are stored raw unless asked.
    feature_compression: str = option(
        "none",
        "Zarr codec for features (none: ~2x faster reads, ~12% larger).",
        choices=("none", "zstd"),
    )
    # Augmented views (stages/common/views.py): V rows per sample, each the teacher on a seeded view.
    views: int = option(
        1, "Views per sample, each a seeded --augment of it (1: one row).", minimum=1
    )
    augment: str | None = option(None, AUGMENT_HELP)
    augment_args: dict = option({}, AUGMENT_ARG_HELP, flag_name="--augment-arg")
    seed: int = option(0, "Seed of the views' generators, with sample_id and view.", minimum=0)
    batch_size: int = option(256, "Teacher batch size.", minimum=1)
    shard_rows: int = option(65536, "Rows per shard.", minimum=1)
    num_workers: int = option(0, "DataLoader workers.", minimum=0, execution=True)
    device: str = option("auto", DEVICE_HELP, execution=True)
    # Not fingerprinted, but recorded per shard: on CPU the count decides the logits' last bits,
    # so a byte-identical resume needs the count of the first run (stages/precompute/conditions.py).
    threads: int | None = option(
        None, "Torch CPU threads (default: torch's choice).", minimum=1, execution=True
    )
    precision: str = option("fp32", "Autocast precision.", choices=("fp32", "bf16", "fp16"))
    task: str = option(tasks.DEFAULT, "Teacher kind.", choices=tasks.names())
    force: bool = option(False, "Replace a store made with other settings.")
    # Without --checkpoint a spec whose weights come from torch's RNG is refused: its soft labels
    # would be those of an untrained network, a mistake nobody wants cached for months.
    random_teacher: bool = option(
        False,
        "Precompute a teacher whose weights are random initial weights (no --checkpoint).",
        execution=True,
    )
    quiet: bool = option(False, QUIET_HELP, cli=False, execution=True)
    storage_options: dict = option({}, STORAGE_HELP, flag_name="--storage-option", execution=True)
    # Device memory per chunk of tokens while a causal LM's batch is encoded (stages/
    # device_encode.py): the peak beyond the teacher's own logits. Not part of the fingerprint:
    # the stored bytes do not depend on it.
    encode_chunk_bytes: int | None = option(
        None,
        "Device bytes one chunk of tokens may use while encoding (default 32 MiB on the CPU, "
        "1 GiB on an accelerator).",
        minimum=1,
        execution=True,
    )
    queue_depth: int = option(
        4,
        "Encoded teacher batches queued for the writer thread.",
        minimum=1,
        cli=False,
        execution=True,
    )
    # The chosen codec's own options (`--top-k`, ...): each codec declares them in its module.
    codec_options: dict = option(
        {}, "The codec's own options (set by its flags).", cli=False, collects=True
    )

    def defaults(self) -> dict:
        task = tasks.get(self.task)
        codec = self.codec or task.codec
        kind = codecs.codec_class(codec)
        return {
            "codec": codec,
            # A task that stores raw outputs (regression) has nothing to temper.
            "temperature": (self.temperature or task.temperature) if task.tempered else 1.0,
            # Options of other codecs are ignored; the chosen codec's get defaults and checks.
            "codec_options": kind.configure(self.codec_options, self.task),
        }

    def problems(self) -> list[str]:
        """Everything that can be checked before a model or a byte of data is touched."""
        out = option_problems(self)
        if self.teacher is None and self.checkpoint is None:
            out.append("--teacher SPEC (and/or --checkpoint FILE) is required")
        out += augment_problems(self.augment, self.augment_args, self.task, self.views)
        if self.task not in tasks.names():
            return out  # (named by the declared check)
        task = tasks.get(self.task)
        if self.budget_bytes_per_token is not None and not task.per_token:
            out.append(
                "--budget-bytes-per-token sizes a per-token codec: use it with --task causal-lm, "
                "or set the codec's own size (--top-k)"
            )
        codec = self.codec or task.codec
        if codec not in codecs.names():
            return out
        kind = codecs.codec_class(codec)
        if self.task not in kind.tasks:
            usable = [n for n in codecs.names() if self.task in codecs.codec_class(n).tasks]
            out.append(
                f"--codec {codec} cannot store a {self.task} teacher: use --codec "
                + " or ".join(usable)
            )
        else:
            try:
                kind.configure(self.codec_options, self.task)
            except UsageError as exc:
                out.append(str(exc))
        return out
