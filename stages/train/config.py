"""Stage two's settings (`kdcache train`), each declared once; `cached_only` the checks that need the
cache, `EXECUTION` the settings that change speed or logging but not what a run computes."""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.stages import tasks
from kdcache.stages.common.config import (
    AUGMENT_ARG_HELP,
    AUGMENT_HELP,
    DEVICE_HELP,
    EVAL_LOGITS_HELP,
    QUIET_HELP,
    STORAGE_HELP,
    TRAIN_PRECISIONS,
    TRAIN_TASKS,
    Checked,
    augment_problems,
    verify_reads_option,
)
from kdcache.stages.common.hooks import POOLS
from kdcache.stages.tasks.scoring import EVAL_LOGITS_MB
from kdcache.stages.train.relations import NAMES as RELATIONS
from kdcache.storage.options import option, option_problems, options_of


@dataclass(kw_only=True, frozen=True)
class TrainConfig(Checked):
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
    agree_rows: int | None = option(
        None,
        "Cached rows measured for teacher agreement (default 5000; 512 blocks for causal-lm).",
        minimum=1,
    )
    eval_batch_size: int | None = option(
        None,
        "Evaluation rows per forward (default 1024; 64 blocks for causal-lm), fewer where "
        "--eval-logits-mb asks.",
        minimum=1,
        execution=True,
    )
    eval_logits_mb: float = option(EVAL_LOGITS_MB, EVAL_LOGITS_HELP, above=0, execution=True)
    # Causal-lm: the chunked loss of stages/tasks/lm_loss.py (exact either way: execution settings).
    fused_head: bool | None = option(
        None,
        "Causal-lm: build the logits chunk by chunk inside the loss from the student's output "
        "layer, never all at once (default: where the student exposes it).",
        execution=True,
    )
    loss_chunk_mb: float | None = option(
        None,
        "Causal-lm: MB of float32 logits per chunk of the loss (default 64; 4 on the CPU).",
        above=0,
        execution=True,
    )
    quiet: bool = option(False, QUIET_HELP, cli=False, execution=True)

    def problems(self) -> list[str]:
        """Checks that need neither the cache nor the student (those with the cache follow in
        stages/train/setup.py's `resolve`)."""
        out = option_problems(self)
        if self.online and self.cache:
            out.append(
                "--teacher runs the teacher online and --cache reads it from a store: "
                "give one of them, not both"
            )
        if self.online and self.beta > 0:
            out.append(
                f"--beta {self.beta}: an online teacher gives no stored features to match: use "
                "--beta 0, or a --cache precomputed with --features"
            )
        if self.beta > 0 and not self.cache:
            out.append("--beta > 0 needs --cache with stored teacher features")
        if self.task in tasks.names() and tasks.get(self.task).needs_cache and not self.cache:
            out.append(f"--task {self.task} needs --cache (a {self.task} teacher's store)")
        if self.beta > 0 and not self.student_features:
            out.append("--beta > 0 needs --student-features NAME (a student submodule)")
        out += augment_problems(self.augment, self.augment_args, self.task)
        return out + cached_only(self)

    def defaults(self) -> dict:
        return {"name": self.name or self.out.rstrip("/").rsplit("/", 1)[-1]}

    @property
    def online(self) -> bool:
        """Distilling from a teacher run on every batch (`--teacher` and/or its checkpoint)."""
        return self.teacher is not None or self.teacher_checkpoint is not None


def cached_only(cfg: TrainConfig, reader=None) -> list[str]:
    """--relation and --pseudo-labels read the cache: its features, its teacher's top-1 class.
    Given the cache's `reader`, also what the store must hold. Returns the problems."""
    out = []
    wants = [
        f for f, on in (("--relation", cfg.relation), ("--pseudo-labels", cfg.pseudo_labels)) if on
    ]
    if wants and not cfg.cache:
        out.append(f"{wants[0]} reads the teacher from a store: give --cache URL")
    if cfg.relation and not cfg.student_features:
        out.append(
            f"--relation {cfg.relation} needs --student-features NAME: the student submodule whose "
            "output is related sample to sample"
        )
    if reader is None:
        return out
    if cfg.relation and not reader.has_features:
        out.append(
            f"--relation {cfg.relation} needs teacher features but the cache {reader.url} stores "
            "none: recompute it with `kdcache precompute --features LAYER`"
        )
    if cfg.pseudo_labels and not tasks.get(reader.task).pseudo_labels:
        out.append(
            f"--pseudo-labels takes a classifier's top-1 class but the cache {reader.url} holds a "
            f"{reader.task} teacher: drop --pseudo-labels"
        )
    return out


# Execution settings change speed or logging, not what a finished run computed: a rerun that
# differs only in these resumes instead of refusing.
EXECUTION = frozenset(o.name for o in options_of(TrainConfig) if o.execution)
