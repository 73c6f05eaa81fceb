"""The settings of every stage, each declared once with its default, help text and checks.

These are plain data: pipeline builds them (defaults < TOML file < command line) and generates
the click options from the declarations; each `validate()` runs the declared checks first, then
only what involves several fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdcache.stages.common.hooks import POOLS
from kdcache.stages.train.relations import NAMES as RELATIONS
from kdcache.storage import codecs
from kdcache.storage.errors import UsageError
from kdcache.storage.options import option, options_of, validate_options

DTYPES = ("float16", "float32")
TRAIN_PRECISIONS = ("fp32", "bf16")
TRAIN_TASKS = ("classification", "regression", "causal-lm")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps."
QUIET_HELP = "No progress bar or info logs."
STORAGE_HELP = "k=v fsspec storage option (repeatable)."
AUGMENT_HELP = "Augmentation spec package.module:attr, called as augment(x, generator)."
AUGMENT_ARG_HELP = "k=v keyword for the augmentation (repeatable)."


# Evaluation's memory is sized in logits, not rows: a chunk of tokens x classes of float32.
EVAL_LOGITS_MB = 256.0
EVAL_LOGITS_HELP = "Evaluation and agreement: MB of float32 logits (tokens x classes) made at once."


def eval_rows(batch_size: int | None, task: str) -> int:
    """Rows per evaluation forward when none is given: 1024, or 64 token blocks."""
    return batch_size or (64 if task == "causal-lm" else 1024)


def check_augment(augment: str | None, args: dict, task: str | None, views: int = 1) -> None:
    """What an augmentation needs of the other options, before anything is built."""
    if augment is None and (views > 1 or args):
        what = f"--views {views}" if views > 1 else "--augment-arg"
        raise UsageError(f"{what} needs --augment SPEC (the seeded augmentation of each view)")
    if augment is not None and task == "causal-lm":
        raise UsageError("--augment: views of token blocks are not supported; drop --augment")


def verify_reads_option():
    """Readers check every store file against the manifest on first read (storage/integrity.py);
    the same opt-out for every command that reads a store."""
    return option(
        True,
        "Do not check each store file against the manifest's checksum when first read.",
        flag_name="--no-verify-reads",
        execution=True,
    )


def default_temperature(task: str) -> float:
    """T when none is given: a language model's own distribution (T = 1) is what its students
    usually match; classifiers' soft labels are tempered (T = 4)."""
    return 1.0 if task == "causal-lm" else 4.0


@dataclass(kw_only=True)
class PrecomputeConfig:
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
        "Choose the codec's size (topk's k, sampled's draws) to fit this many bytes per token.",
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
    task: str = option(
        "classification", "Teacher kind.", choices=("classification", "regression", "causal-lm")
    )
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
        4, "Encoded batches queued for the writer thread.", minimum=1, cli=False, execution=True
    )
    # The chosen codec's own options (`--top-k`, ...): each codec declares them in its module.
    codec_options: dict = option(
        {}, "The codec's own options (set by its flags).", cli=False, collects=True
    )

    def validate(self) -> None:
        """Everything that can be checked before a model or a byte of data is touched."""
        if self.codec is None:
            self.codec = {"regression": "dense", "causal-lm": "sampled"}.get(self.task, "topk")
        if self.task == "regression":
            self.temperature = 1.0  # raw outputs are stored; there is nothing to temper
        elif self.temperature is None:
            self.temperature = default_temperature(self.task)
        validate_options(self)
        kind = codecs.codec_class(self.codec)
        if self.task not in kind.tasks:
            usable = [n for n in codecs.names() if self.task in codecs.codec_class(n).tasks]
            raise UsageError(
                f"--codec {self.codec} cannot store a {self.task} teacher: use --codec "
                + " or ".join(usable)
            )
        if self.budget_bytes_per_token is not None and self.task != "causal-lm":
            raise UsageError(
                "--budget-bytes-per-token sizes a per-token codec: use it with --task causal-lm, "
                "or set the codec's own size (--top-k)"
            )
        # Options of other codecs are ignored; the chosen codec's get their defaults and checks.
        self.codec_options = kind.configure(self.codec_options, self.task)
        if self.teacher is None and self.checkpoint is None:
            raise UsageError("--teacher SPEC (and/or --checkpoint FILE) is required")
        check_augment(self.augment, self.augment_args, self.task, self.views)


@dataclass(kw_only=True)
class TrainConfig:
    cache: str | None = option(
        None, "Store URL from `kdcache precompute`; omit to train on hard labels or with --teacher."
    )
    # Online KD: the exact full-KD reference that cached students are compared with.
    teacher: str | None = option(None, "Teacher spec run online on every batch (no --cache).")
    teacher_args: dict = option(
        {}, "k=v keyword for the online teacher (repeatable).", flag_name="--teacher-arg"
    )
    teacher_checkpoint: str | None = option(
        None, "The online teacher's state dict, TorchScript or torch.export file (path or URL)."
    )
    student: str = option(help="Student spec package.module:attr (class or factory).")
    student_args: dict = option(
        {}, "k=v keyword for the student (repeatable).", flag_name="--student-arg"
    )
    data: str = option(help="The data set the cache was made from (joined by sample_id).")
    data_args: dict = option(
        {}, "k=v keyword for the data set (repeatable).", flag_name="--data-arg"
    )
    # With --cache the store says what the teacher was; without one the data cannot.
    task: str | None = option(
        None,
        "Task without --cache (classification or causal-lm); with one, the store's.",
        choices=TRAIN_TASKS,
    )
    eval_data: str | None = option(None, "Labeled data set evaluated after every epoch.")
    eval_data_args: dict = option(
        {}, "k=v keyword for the eval data set (repeatable).", flag_name="--eval-data-arg"
    )
    out: str = option(help="Output folder or URL (metrics.csv, checkpoints, model.pt, summary).")
    name: str | None = option(None, "Run name (default: the last part of --out).", cli=False)
    temperature: float | None = option(
        None, "Distillation T (default: the cache's; online 4, or 1 for causal-lm).", above=0
    )
    # None: 0.9, or 1 on a regression store without targets (stages/tasks/regression.py).
    alpha: float | None = option(
        None, "Weight of the soft loss (default 0.9; 1 on a store without targets).", minimum=0,
        maximum=1,
    )  # fmt: skip
    normalize_targets: bool = option(
        False, "Regression: divide squared errors by the stored targets' variance (unit-free loss)."
    )
    beta: float = option(0.0, "Weight of the feature loss.", minimum=0)
    student_features: str | None = option(
        None, "Student submodule whose output matches the features."
    )
    pool: str = option("avg", "Pooling.", choices=POOLS)
    # Relations between the samples of a batch, from the same tap (stages/train/relations.py), and the
    # baseline that asks whether soft labels beat the teacher's hard ones.
    relation: str | None = option(
        None,
        "Relation loss between batch samples' features (needs --student-features).",
        choices=RELATIONS,
    )
    gamma: float = option(1.0, "Weight of the relation loss.", minimum=0)
    pseudo_labels: bool = option(
        False,
        "Hard labels = the cached teacher's top-1 class on every row (--alpha 0: no soft term).",
    )
    epochs: int = option(20, "Epochs.", minimum=1)
    batch_size: int = option(256, "Batch size.", minimum=1)
    lr: float = option(1e-3, "Peak AdamW learning rate.", above=0)
    weight_decay: float = option(0.01, "AdamW weight decay.", minimum=0)
    warmup: float = option(0.05, "Warmup as a fraction of all steps.", minimum=0, below=1)
    seed: int = option(0, "Seed of the student's init, the data order and the views seen.")
    # With a cache of views, the augmentation is the store's (a given one must match); otherwise
    # it is applied on the fly, a fresh view per epoch the soft labels were not computed on.
    augment: str | None = option(
        None, AUGMENT_HELP + " Default: a cache of views' own; else applied on the fly."
    )
    augment_args: dict = option({}, AUGMENT_ARG_HELP, flag_name="--augment-arg")
    check_inputs: bool = option(
        True, "Do not re-hash replayed views.", flag_name="--no-check-inputs", execution=True
    )
    # num_workers is an execution setting although each worker streams its own slice of the epoch
    # (so the count shapes the row order): resuming with another count still sees every row once.
    num_workers: int = option(0, "DataLoader workers.", minimum=0, execution=True)
    device: str = option("auto", DEVICE_HELP, execution=True)
    threads: int | None = option(
        None, "Torch CPU threads (default: torch's choice).", minimum=1, execution=True
    )
    precision: str = option("fp32", "Autocast precision.", choices=TRAIN_PRECISIONS)
    storage_options: dict = option({}, STORAGE_HELP, flag_name="--storage-option", execution=True)
    ignore_fingerprint: bool = option(False, "Train on other --data.", execution=True)
    buffer_size: int = option(16384, "Shuffle buffer rows.", minimum=0)
    prefetch: int = option(2, "Shards read ahead.", minimum=1, execution=True)
    verify_reads: bool = verify_reads_option()
    agree_rows: int = option(
        5000, "Cached rows (blocks for causal-lm) measured for teacher agreement.", minimum=1
    )
    eval_batch_size: int | None = option(
        None,
        "Evaluation rows per forward (default 1024; 64 blocks for causal-lm), fewer where "
        "--eval-logits-mb asks.",
        minimum=1,
        execution=True,
    )
    eval_logits_mb: float = option(EVAL_LOGITS_MB, EVAL_LOGITS_HELP, above=0, execution=True)
    # Causal-lm: the chunked loss of stages/train/lm_loss.py (exact either way: execution settings).
    fused_head: bool | None = option(
        None,
        "Causal-lm: build the logits chunk by chunk inside the loss from the student's output "
        "layer, never all at once (default: where the student exposes it).",
        execution=True,
    )
    loss_chunk_mb: float = option(
        64.0, "Causal-lm: MB of float32 logits per chunk of the loss.", above=0, execution=True
    )
    quiet: bool = option(False, QUIET_HELP, cli=False, execution=True)

    def validate(self) -> None:
        """Checks that need neither the cache nor the student (those follow in `_setup`)."""
        validate_options(self)
        if self.online and self.cache:
            raise UsageError(
                "--teacher runs the teacher online and --cache reads it from a store: "
                "give one of them, not both"
            )
        if self.online and self.beta > 0:
            raise UsageError(
                f"--beta {self.beta}: an online teacher gives no stored features to match: use "
                "--beta 0, or a --cache precomputed with --features"
            )
        if self.beta > 0 and not self.cache:
            raise UsageError("--beta > 0 needs --cache with stored teacher features")
        if self.task == "regression" and not self.cache:
            raise UsageError("--task regression needs --cache (a regression teacher's store)")
        if self.beta > 0 and not self.student_features:
            raise UsageError("--beta > 0 needs --student-features NAME (a student submodule)")
        check_augment(self.augment, self.augment_args, self.task)
        cached_only(self)
        self.name = self.name or self.out.rstrip("/").rsplit("/", 1)[-1]

    @property
    def online(self) -> bool:
        """Distilling from a teacher run on every batch (`--teacher` and/or its checkpoint)."""
        return self.teacher is not None or self.teacher_checkpoint is not None


def cached_only(cfg: TrainConfig, reader=None) -> None:
    """--relation and --pseudo-labels read the cache: its features, its teacher's top-1 class.
    Given the cache's `reader` (and cfg.task settled from it), also what the store must hold."""
    wants = [
        f for f, on in (("--relation", cfg.relation), ("--pseudo-labels", cfg.pseudo_labels)) if on
    ]
    if wants and not cfg.cache:
        raise UsageError(f"{wants[0]} reads the teacher from a store: give --cache URL")
    if cfg.relation and not cfg.student_features:
        raise UsageError(
            f"--relation {cfg.relation} needs --student-features NAME: the student submodule whose "
            "output is related sample to sample"
        )
    if reader is None:
        return
    if cfg.relation and not reader.has_features:
        raise UsageError(
            f"--relation {cfg.relation} needs teacher features but the cache {reader.url} stores "
            "none: recompute it with `kdcache precompute --features LAYER`"
        )
    if cfg.pseudo_labels and cfg.task != "classification":
        raise UsageError(
            f"--pseudo-labels takes a classifier's top-1 class but the cache {reader.url} holds a "
            f"{cfg.task} teacher: drop --pseudo-labels"
        )


# Execution settings change speed or logging, not what a finished run computed: a rerun that
# differs only in these resumes instead of refusing.
EXECUTION = frozenset(o.name for o in options_of(TrainConfig) if o.execution)


@dataclass(kw_only=True)
class EvaluateConfig:
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
        choices=("classification", "causal-lm"),
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
    agree_rows: int = option(
        5000, "Cached rows (blocks for causal-lm) measured for teacher agreement.", minimum=1
    )
    ignore_fingerprint: bool = option(False, "Skip the cache data check.", execution=True)
    storage_options: dict = option({}, STORAGE_HELP, flag_name="--storage-option", execution=True)
    verify_reads: bool = verify_reads_option()

    def validate(self) -> None:
        validate_options(self)


@dataclass(kw_only=True)
class InspectConfig:
    deep: bool = option(
        False, "Also read every row and feature (each file checked) and count non-finite values."
    )
    verify_reads: bool = verify_reads_option()
    storage_options: dict = option({}, STORAGE_HELP, flag_name="--storage-option", execution=True)

    def validate(self) -> None:
        validate_options(self)


@dataclass(kw_only=True)
class ReportConfig:
    runs: str = option("runs", "Folder of the job's runs.")
    out: str | None = option(
        None, "Markdown file (default RUNS/report.md); JSON and PNGs go beside it."
    )
    teacher: str | None = option(
        None, "The teacher's `kdcache train` folder (default RUNS/teacher)."
    )
    students: str | None = option(
        None, "Folder with one folder per student (default RUNS/students)."
    )
    lm: str | None = option(
        None,
        "The language-model job's runs: teacher/ and students/ (default RUNS/lm; skipped when "
        "absent).",
    )
    plots: bool = option(True, "Skip the PNGs (no matplotlib needed).", flag_name="--no-plots")
    # Recomputing teacher agreement on the eval data loads the models.
    agreement: bool = option(
        True, "Do not load the models to measure teacher agreement.", flag_name="--no-agreement"
    )
    # Timing needs the models too: --no-agreement skips it as well.
    deploy: bool = option(
        True, "Do not time the models (CPU latency, int8 copies).", flag_name="--no-deploy"
    )

    def validate(self) -> None:
        validate_options(self)
        root = Path(self.runs)
        self.out = self.out or str(root / "report.md")
        self.teacher = self.teacher or str(root / "teacher")
        self.students = self.students or str(root / "students")
        self.lm = self.lm or str(root / "lm")
        # Either job alone makes a report: the classifier job's students or the LM job's runs.
        if not Path(self.students).is_dir() and not Path(self.lm).is_dir():
            raise UsageError(
                f"--students {self.students}: no such folder (nor --lm {self.lm}); "
                "train students first "
                "(`make students` or `kdcache train --config ... --out FOLDER`)"
            )
