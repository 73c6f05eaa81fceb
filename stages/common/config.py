"""How every stage's settings are checked and resolved (`Checked`), and what the stages' configs
share (help texts, the evaluation batch default, the augmentation checks). Each stage declares its
own config in its folder (`precompute/config.py`, `train/config.py`, `evaluate/config.py`,
`report/config.py`), each setting once with its default, help text and checks.

These are plain, frozen data: pipeline builds them (defaults < TOML file < command line) and
generates the click options from the declarations. Each config is checked whole: `problems()`
lists every failed check (the declared ones, then those involving several fields) and
`validate()` raises them all in one line. `resolved()` returns a new, checked config with its
defaults filled (a codec, a temperature, a run name); nothing mutates a config once built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdcache.stages import tasks
from kdcache.storage.options import option, option_problems, raise_problems

DTYPES = ("float16", "float32")
TRAIN_PRECISIONS = ("fp32", "bf16")
TRAIN_TASKS = tasks.names()
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps."
QUIET_HELP = "No progress bar or info logs."
STORAGE_HELP = "k=v fsspec storage option (repeatable)."
AUGMENT_HELP = "Augmentation spec package.module:attr, called as augment(x, generator)."
AUGMENT_ARG_HELP = "k=v keyword for the augmentation (repeatable)."


# Evaluation's memory is sized in logits, not rows: a chunk of tokens x classes of float32.
EVAL_LOGITS_HELP = "Evaluation and agreement: MB of float32 logits (tokens x classes) made at once."


def eval_rows(batch_size: int | None, task: str | None) -> int:
    """Rows per evaluation forward when none is given: the task's (1024, or 64 token blocks)."""
    return batch_size or tasks.get(task).eval_rows


def augment_problems(augment: str | None, args: dict, task: str | None, views: int = 1) -> list:
    """What an augmentation needs of the other options, before anything is built."""
    out = []
    if augment is None and (views > 1 or args):
        what = f"--views {views}" if views > 1 else "--augment-arg"
        out.append(f"{what} needs --augment SPEC (the seeded augmentation of each view)")
    if augment is not None and task in tasks.names() and not tasks.get(task).augmentable:
        what = "token blocks" if tasks.get(task).per_token else f"{task} inputs"
        out.append(f"--augment: views of {what} are not supported; drop --augment")
    return out


def verify_reads_option():
    """Readers check every store file against the manifest on first read (storage/integrity.py);
    the same opt-out for every command that reads a store."""
    return option(
        True,
        "Do not check each store file against the manifest's checksum when first read.",
        flag_name="--no-verify-reads",
        execution=True,
    )


def default_temperature(task: str | None) -> float:
    """T when none is given, the task's: a language model's own distribution (T = 1) is what its
    students usually match; classifiers' soft labels are tempered (T = 4)."""
    return tasks.get(task).temperature


@dataclass(frozen=True)
class Checked:
    """The shared check-and-resolve of every config: `problems()` (every failed check),
    `validate()` (all of them raised at once), `resolved()` (a new config, defaults filled)."""

    def problems(self) -> list[str]:
        return option_problems(self)

    def validate(self) -> None:
        raise_problems(self.problems())

    def resolved(self):
        self.validate()
        return dataclasses.replace(self, **self.defaults())

    def defaults(self) -> dict:
        """The fields `resolved()` fills."""
        return {}
