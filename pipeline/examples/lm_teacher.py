"""The language-model job's committed teacher: a GPT-2 trained once by this repository's own
`make lm-teacher-checkpoint`, kept in git so that `make run` distils from a sharp teacher without
paying for its training.

Two files (``checkpoints/`` at the repository root):

- ``lm-teacher.safetensors``: the weights, float32 as trained (the tied output layer is
  ``transformer.wte`` once);
- ``lm-teacher.json``, the card: the weights' sha256 and size; the text settings and the
  digests of the corpus and of the tokenizer they were trained on (the weights mean nothing with
  another tokenizer); the training run's own ``summary.json`` and ``metrics.csv`` rows; how long
  the rebuild took.

``restore`` checks all of that against this machine and the job's settings, then writes a
``kdcache train --out`` folder (model.pt, metrics.csv, summary.json, and ``committed.json``
naming the card) that precompute, online KD and the report read as if the teacher had been
trained here. ``export`` makes the two files from such a trained folder. Every refusal is one
line naming the file or value and the fix.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import click
import torch

from kdcache.pipeline.cli_common import handle_errors
from kdcache.pipeline.examples import text
from kdcache.pipeline.specs import parse_kv
from kdcache.stages.train.run_folder import RunFolder
from kdcache.storage.errors import UsageError

FORMAT = 1
MARKER = "committed.json"
# The settings of the teacher's training data that its weights depend on (max_tokens only says
# how much of the corpus it saw: the caches and students may use any amount).
TEXT_KEYS = ("vocab", "block", "max_bytes")
LFS_HEADER = b"version https://git-lfs"
REBUILD = "make lm-teacher-checkpoint"
RETRAIN = "or train one for these settings with LM_TEACHER=train"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenizer_digests(vocab: int, max_bytes: int | None) -> dict:
    """Digests of the corpus (the pinned torch's sources, checked) and of the tokenizer trained
    on it here (trained once into the data cache, as TextBlocks would)."""
    folder = text.cache_folder(vocab, max_bytes)
    text.load_tokenizer(folder, vocab, max_bytes)
    return {
        "corpus_sha256": text.corpus().sha256,
        "tokenizer_sha256": sha256_of(folder / "tokenizer.json"),
        "torch": torch.__version__.split("+")[0],
        "tokenizers": metadata.version("tokenizers"),
    }


def read_card(card: Path) -> dict:
    try:
        doc = json.loads(card.read_text())
    except FileNotFoundError:
        raise UsageError(
            f"the teacher card {card} does not exist: restore it with `git checkout -- {card}`, "
            "or rebuild it with `make lm-teacher-checkpoint`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"the teacher card {card} is not JSON ({exc}): restore it with `git checkout -- {card}`"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UsageError(
            f"the teacher card {card} is not a format-{FORMAT} card: restore it with "
            f"`git checkout -- {card}`, or rebuild it with `make lm-teacher-checkpoint`"
        )
    return doc


def checked_weights(card: Path, doc: dict) -> Path:
    """The weights file the card names, after its size and sha256 are checked."""
    path = card.parent / doc["weights"]
    fix = f"restore it with `git checkout -- {path}`, or rebuild both with `{REBUILD}`"
    if not path.is_file():
        raise UsageError(f"the teacher weights {path} do not exist: {fix}")
    data = path.read_bytes()
    if data.startswith(LFS_HEADER):
        raise UsageError(
            f"the teacher weights {path} are a Git LFS pointer, not the file: they are committed "
            f"as a plain file, so clone without an LFS filter for them, or {fix}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != doc["sha256"]:
        raise UsageError(
            f"the teacher weights {path} have sha256 {digest[:12]} ({len(data)} bytes), not the "
            f"{doc['sha256'][:12]} ({doc['bytes']} bytes) that {card} records: {fix}"
        )
    return path


def check_settings(card: Path, doc: dict, student_args: dict, text_args: dict) -> None:
    """The job's teacher size and text settings are the ones the weights were trained with."""
    trained = doc["summary"]["student_args"]
    if student_args != trained:
        raise UsageError(
            f"the committed teacher ({card}) is {_kv(trained)}, not {_kv(student_args)}: keep "
            f"LM_TEACHER_SIZE and LM_VOCAB/LM_BLOCK as they are, {RETRAIN}"
        )
    data_args = doc["summary"]["settings"]["data_args"]
    want = {k: data_args.get(k) for k in TEXT_KEYS}
    got = {k: text_args.get(k) for k in TEXT_KEYS}
    if want != got:
        raise UsageError(
            f"the committed teacher ({card}) was trained on text {_kv(want)}, not {_kv(got)}: "
            f"keep LM_VOCAB/LM_BLOCK/LM_TOKENIZER_BYTES as they are, {RETRAIN}"
        )


def check_tokenizer(card: Path, doc: dict) -> None:
    """This machine's corpus and tokenizer are the ones the weights were trained on."""
    args = doc["summary"]["settings"]["data_args"]
    here, then = tokenizer_digests(args["vocab"], args.get("max_bytes")), doc["text"]
    for key, what in (("corpus_sha256", "corpus"), ("tokenizer_sha256", "tokenizer")):
        if here[key] != then[key]:
            raise UsageError(
                f"the {what} here (sha256 {here[key][:12]}; torch {here['torch']}, tokenizers "
                f"{here['tokenizers']}) is not the one the committed teacher ({card}) was "
                f"trained on ({then[key][:12]}; torch {then['torch']}, tokenizers "
                f"{then['tokenizers']}): install those versions, {RETRAIN}"
            )


def load_weights(path: Path, spec_args: dict) -> torch.nn.Module:
    """The weights in a GPT-2 of the declared size, every tensor checked (strict load)."""
    from safetensors.torch import load_file

    from kdcache.pipeline.examples.lm import gpt2

    model = gpt2(**spec_args)
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The output layer is tied to the input embedding: stored once, as transformer.wte.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UsageError(
            f"the teacher weights {path} do not fit gpt2({_kv(spec_args)}): missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}; rebuild with `make lm-teacher-checkpoint`"
        )
    return model.eval()


def restore(card: Path, out: str, student_args: dict, text_args: dict) -> str:
    """Write the committed teacher as a finished `kdcache train` folder at `out`; returns what
    was done. A folder restored from the same weights is left alone; one trained here is refused
    rather than overwritten (an hour of training)."""
    doc = read_card(card)
    weights = checked_weights(card, doc)
    check_settings(card, doc, student_args, text_args)
    check_tokenizer(card, doc)
    folder = RunFolder(out)
    if folder.loc.exists(MARKER):
        same = json.loads(folder.loc.read_bytes(MARKER)).get("sha256") == doc["sha256"]
        if same and folder.summary() is not None:
            return f"teacher: the committed {weights} (sha256 {doc['sha256'][:12]}) is in {out}"
    elif folder.summary() is not None or folder.loc.exists("model.pt"):
        raise UsageError(
            f"{out} holds a teacher trained here, not the committed one: keep using it with "
            f"LM_TEACHER=train, or delete {out} to use {weights}"
        )
    model = load_weights(weights, student_args)
    # The marker goes first and the summary last, so a half-written folder is never "finished"
    # (RunFolder: summary.json means done) and is rewritten by the next restore.
    write_marker(folder, card, doc)
    folder.write_model(model.state_dict())
    folder.write_rows(doc["metrics"])
    folder.write_summary(doc["summary"])
    loss = doc["summary"]["final"]["eval_loss"]
    return (
        f"teacher: restored {weights} (sha256 {doc['sha256'][:12]}, validation loss "
        f"{loss:.3f} nats/token) into {out}"
    )


def write_marker(folder: RunFolder, card: Path, doc: dict) -> None:
    marker = {"card": str(card), "sha256": doc["sha256"]}
    folder.loc.write_bytes(json.dumps(marker).encode(), MARKER)


def _kv(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


@click.group()
def main() -> None:
    """The committed LM teacher: restore it into a run folder, or export a trained one."""


@main.command("restore")
@click.option("--card", type=click.Path(path_type=Path), required=True)
@click.option("--out", required=True, help="The teacher's `kdcache train --out` folder.")
@click.option("--student-arg", multiple=True, help="k=v: the size the job builds the teacher at.")
@click.option("--data-arg", multiple=True, help="k=v: the job's TextBlocks settings.")
@handle_errors
def restore_command(card, out, student_arg, data_arg) -> None:
    """Check the committed teacher (sha256, size, tokenizer) and write it as a run folder."""
    student_args = parse_kv(student_arg, "--student-arg")
    click.echo(restore(card, out, student_args, parse_kv(data_arg, "--data-arg")))


@main.command("export")
@click.option("--run", required=True, help="A finished `kdcache train` folder of the teacher.")
@click.option("--card", type=click.Path(path_type=Path), required=True)
@click.option("--command", "command", default="make lm-teacher-checkpoint")
@handle_errors
def export_command(run, card, command) -> None:
    """Write the weights (safetensors) and the card from a trained teacher's folder."""
    from kdcache.pipeline.examples.lm_teacher_export import export

    doc = export(run, card, command)
    click.echo(f"wrote {card} and {doc['weights']}: sha256 {doc['sha256']}, {doc['bytes']} bytes")


if __name__ == "__main__":
    main()
