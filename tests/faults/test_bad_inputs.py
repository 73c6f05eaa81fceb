"""Bad inputs through the real CLI: each gives one line naming the value and the fix, a non-zero
exit, no traceback, and leaves nothing that looks complete (no manifest / no summary.json, and
`kdcache verify` refuses the --out of a failed precompute).

A case builds its command from a fresh tmp folder and a shared toy cache (copied when the case
damages it); `needles` are what the one line must contain (the bad value and the fix).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.conftest import DATA, TEACHER, assert_one_line_error, cli_args, toy_precompute
from tests.faults.conftest import invoke, run_with_fault
from tests.toy_models import ToyNet


@dataclass
class Case:
    name: str
    fault: str
    build: Callable  # (tmp: Path, cache: Path) -> list of CLI args
    exit: int
    needles: tuple[str, ...]
    stage: str = "precompute"  # which output must not look complete
    xfail: str | None = None
    warning: bool = False  # the expected outcome is exit 0 with one warning line
    features: bool = False  # built on the toy cache with stored features
    args: list = field(default_factory=list)


def pre(tmp: Path, *extra: str, n: int = 50) -> list[str]:
    return cli_args(tmp / "store", *extra, n=n)


def train(cache: Path, tmp: Path, *extra: str, n: int = 50) -> list[str]:
    return [
        "train", "--cache", str(cache), "--student", TEACHER, "--data", DATA,
        "--data-arg", f"n={n}", "--epochs", "1", "--device", "cpu", "--threads", "1",
        "--out", str(tmp / "student"), "--quiet", *extra,
    ]  # fmt: skip


def damaged(cache: Path, tmp: Path, damage) -> Path:
    copy = tmp / "cache"
    shutil.copytree(cache, copy)
    damage(copy)
    return copy


def edit_manifest(fn):
    def damage(root: Path) -> None:
        doc = json.loads((root / "manifest.json").read_text())
        fn(doc)
        (root / "manifest.json").write_text(json.dumps(doc))

    return damage


def truncate(rel: str):
    def damage(root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: len(data) // 2])

    return damage


def flip(rel: str, at: float = 0.5):
    def damage(root: Path) -> None:
        data = bytearray((root / rel).read_bytes())
        data[int(len(data) * at)] ^= 0x01
        (root / rel).write_bytes(bytes(data))

    return damage


def write(tmp: Path, name: str, data: bytes | str) -> Path:
    p = tmp / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def other_checkpoint(tmp: Path) -> Path:
    buf = io.BytesIO()
    torch.save(ToyNet(num_classes=5).state_dict(), buf)
    return write(tmp, "other.pt", buf.getvalue())


def train_once(cache: Path, tmp: Path) -> None:
    invoke(*train(cache, tmp))


def killed_after_epoch_1(cache: Path, tmp: Path) -> None:
    res = run_with_fault(train(cache, tmp, "--epochs", "2"), "checkpoint.saved:1")
    assert res.returncode == -9, res.stderr


def lm_train(tmp: Path, *extra: str, student: str = "tests.toy_models:ToyCausalLM") -> list[str]:
    """A student of a small sampled causal-lm store (V = 64), built in `tmp` (issue 22's cases)."""
    data = ["--data", "tests.toy_models:ToyTokens", "--data-arg", "n=8"]
    invoke(
        "precompute",
        "--task",
        "causal-lm",
        "--teacher",
        "tests.toy_models:ToyCausalLM",
        *data,
        "--out",
        str(tmp / "lm"),
        "--random-teacher",
        "--device",
        "cpu",
        "--quiet",
    )
    return [
        "train",
        "--cache",
        str(tmp / "lm"),
        "--student",
        student,
        *data,
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp / "student"),
        "--quiet",
        *extra,
    ]


def second_run(tmp: Path, *first: str, second: tuple[str, ...]) -> list[str]:
    invoke(*pre(tmp, *first))
    return pre(tmp, *first, *second)


def text_data(tmp: Path, *args: str, file: str = "docs.jsonl", template: bool = True) -> list:
    """--data kdcache:text_dataset over tiny files written in `tmp` (tests/pipeline/text_fixtures)."""
    from tests.pipeline import text_fixtures as fx

    made = fx.inputs(tmp)
    tokenizer = tmp / "tokenizer" if template else fx.tokenizer(tmp / "plain", chat_template=False)
    write(tmp, "docs.csv", "text\nthe cat\n")
    (tmp / "empty").mkdir(exist_ok=True)
    path = made.get(file.removesuffix(".jsonl"), tmp / file)
    pairs = [f"path={path}", f"tokenizer={tokenizer}", *args]
    return ["--data", "kdcache:text_dataset", *[a for p in pairs for a in ("--data-arg", p)]]


TINY_LM = ["--teacher", "kdcache.pipeline.examples.lm:TinyCausalLM", "--teacher-arg",
           "vocab_size=320", "--random-teacher"]  # fmt: skip


def text_pre(tmp: Path, *args: str, teacher=TINY_LM, **kw) -> list[str]:
    return ["precompute", "--task", "causal-lm", *teacher, *text_data(tmp, *args, **kw),
            "--out", str(tmp / "store"), "--device", "cpu", "--quiet"]  # fmt: skip


def short_llama(tmp: Path) -> list[str]:
    """A Llama teacher built from a config with 32 positions (kdcache:hf_causal_lm config=)."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=320,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
    ).save_pretrained(tmp / "llama")
    return ["--teacher", "kdcache:hf_causal_lm", "--teacher-arg", f"config={tmp / 'llama'}",
            "--random-teacher"]  # fmt: skip


def text_other_data(tmp: Path) -> list[str]:
    """A text store, then a student given the file with one byte changed (a row's id)."""
    invoke(*text_pre(tmp, "block_size=32"))  # (writes the files; text_data would rewrite them)
    docs = tmp / "docs.jsonl"
    data = bytearray(docs.read_bytes())
    data[data.rindex(b'"id": ') + 6] ^= 1
    docs.write_bytes(bytes(data))
    return ["train", "--cache", str(tmp / "store"), "--student",
            "kdcache.pipeline.examples.lm:TinyCausalLM", "--student-arg", "vocab_size=320",
            "--data", "kdcache:text_dataset", "--data-arg", f"path={docs}", "--data-arg",
            f"tokenizer={tmp / 'tokenizer'}", "--data-arg", "block_size=32", "--epochs", "1",
            "--device", "cpu", "--out", str(tmp / "student"), "--quiet"]  # fmt: skip


M = "tests.toy_models"
B = "tests.faults.bad_data"
CASES = [
    # ---------------------------------------------------------------- the teacher's outputs
    Case("NaN logits", "a teacher returning NaN", lambda t, c: pre(t, "--teacher", f"{M}:NaNNet"),
         2, ("NaN", "sample_id [0, 1]", "--precision fp32")),
    Case("inf logits", "a teacher returning inf",
         lambda t, c: pre(t, "--teacher", f"{M}:NaNNet", "--teacher-arg", "inf=true"),
         2, ("Inf", "sample_id [0, 1]")),
    Case("logits of the wrong shape", "a teacher returning (B, C, 2)",
         lambda t, c: pre(t, "--teacher", f"{M}:WrongShapeNet"), 2, ("shape (2, 10, 2) for a batch of 2", "must return logits of shape (batch, num_classes)")),
    Case("teacher not a module", "--teacher names a plain callable",
         lambda t, c: pre(t, "--teacher", f"{M}:NotAModule"), 2, ("built a NotAModule, not a torch.nn.Module", "a factory that returns one")),
    # ---------------------------------------------------------------- the data set
    Case("label >= C", "a label 99 with 10 classes",
         lambda t, c: pre(t, "--data", f"{M}:BadLabelData"), 2,
         ("label 99", "sample_id 30", "fix the data set")),
    Case("label < 0", "a label -3",
         lambda t, c: pre(t, "--data", f"{M}:BadLabelData", "--data-arg", "bad_label=-3"),
         2, ("label -3 of sample_id 30", "fix the data set")),
    Case("empty data set", "a data set of length 0",
         lambda t, c: pre(t, "--data", f"{M}:EmptyData"), 2, ("EmptyData' with {'n': 50} is empty", "check its arguments")),
    Case("items of the wrong type", "items are str",
         lambda t, c: pre(t, "--data", f"{B}:StringItems"), 2,
         (f"--data '{B}:StringItems' sample 0", "str", "return a tensor")),
    Case("data set without __getitem__", "a class with __len__ only",
         lambda t, c: pre(t, "--data", f"{B}:NotIndexable"), 2, ("built a NotIndexable, which is not a map-style", "a class or factory that returns one")),
    Case("inputs of different shapes", "token blocks of 3-12 ids as classifier inputs",
         lambda t, c: pre(t, "--data", f"{M}:ToyTokens"), 2, ("sample 1", "shape", "pad")),
    Case("inputs the teacher cannot take", "16-d inputs for an 8-d teacher",
         lambda t, c: pre(t, "--data", f"{B}:WideInputs"), 1, ("(2x16 and 8x64)", "check that --teacher takes the inputs --data gives")),
    # ---------------------------------------------------------------- specs and options
    Case("malformed spec", "--teacher tests.toy_models.ToyNet (no colon)",
         lambda t, c: pre(t, "--teacher", f"{M}.ToyNet"), 2, ("--teacher 'tests.toy_models.ToyNet' is not", "package.module:attr")),
    Case("module not found", "--teacher nosuch_pkg.models:Net",
         lambda t, c: pre(t, "--teacher", "nosuch_pkg.models:Net"), 2, ("cannot import 'nosuch_pkg.models'", "check the spelling")),
    Case("attribute not found", "--teacher tests.toy_models:Nope",
         lambda t, c: pre(t, "--teacher", f"{M}:Nope"), 2, ("has no attribute 'Nope'", "check the name after the colon")),
    Case("unknown feature layer", "--features nosuch",
         lambda t, c: pre(t, "--features", "nosuch"), 2,
         ("'nosuch'", "named_modules(): body")),
    Case("feature layer never called", "--features spare (not run by forward)",
         lambda t, c: pre(t, "--features", "spare"), 2, ("spare", "forward")),
    Case("top-k > classes", "--top-k 20 of 10 classes",
         lambda t, c: pre(t, "--top-k", "20"), 2, ("--top-k 20 exceeds the teacher's 10 classes", "use <= 10")),
    Case("temperature 0", "--temperature 0", lambda t, c: pre(t, "--temperature", "0"),
         2, ("--temperature 0.0 must be > 0",)),
    Case("bad key=value", "--data-arg n (no =)", lambda t, c: pre(t, "--data-arg", "n"),
         2, ("--data-arg 'n'", "KEY=VALUE")),
    Case("--config with an unknown key", "tempreature = 2 in the TOML",
         lambda t, c: pre(t, "--config", write(t, "c.toml", "tempreature = 2\n")),
         2, ("'tempreature'", "did you mean 'tempreature' -> 'temperature'")),
    Case("--config not TOML", "a file of garbage",
         lambda t, c: pre(t, "--config", write(t, "c.toml", "this is = = not toml\n")),
         2, ("c.toml' is not valid TOML", "(at line 1, column 6)")),
    Case("--config missing", "a path that does not exist",
         lambda t, c: pre(t, "--config", str(t / "nope.toml")), 2, ("nope.toml' does not exist", "check the path")),
    Case("unknown device", "--device tpu9", lambda t, c: pre(t, "--device", "tpu9"),
         2, ("--device 'tpu9' is not a device", "use auto, cpu")),
    # ---------------------------------------------------------------- checkpoints
    Case("--checkpoint missing", "a path that does not exist",
         lambda t, c: pre(t, "--checkpoint", str(t / "nope.pt")), 2,
         ("--checkpoint", "nope.pt' does not exist", "check the path")),
    Case("--checkpoint of another model", "a 5-class state dict for a 10-class teacher",
         lambda t, c: pre(t, "--checkpoint", str(other_checkpoint(t))), 2,
         ("other.pt", "in the file", "trained with")),
    Case("garbage --checkpoint", "a file of random bytes",
         lambda t, c: pre(t, "--checkpoint", str(write(t, "garbage.pt", b"\x00junk" * 50))),
         2, ("garbage.pt' cannot be loaded", "torch.save(model.state_dict(), path)")),
    Case("teacher without --checkpoint", "an unseeded teacher spec, no --checkpoint",
         lambda t, c: pre(t, "--teacher-arg", "seed=null"), 2, ("--checkpoint", "--random-teacher")),
    # ---------------------------------------------------------------- the --out store
    Case("--out of other settings", "a store made at T=4, rerun at T=2",
         lambda t, c: second_run(t, second=("--temperature", "2")), 2,
         ("temperature: 4.0 -> 2.0", "--force")),
    Case("--out not a store", "a folder of someone else's files",
         lambda t, c: (write((t / "store").mkdir() or t / "store", "notes.txt", "x"), pre(t))[1],
         2, ("(notes.txt ...)", "choose a new or empty --out")),
    Case("damaged _run.json in --out", "the run header of a killed run cut in half",
         lambda t, c: (second_run(t, second=()), truncate("_run.json")(t / "store"),
                       (t / "store/manifest.json").unlink(), pre(t))[3],
         1, ("_run.json", "not valid JSON", "--force")),
    Case("--out is a file", "--out names an existing regular file",
         lambda t, c: (write(t, "store", "x"), pre(t))[1], 2,
         ("store: a file, not a folder", "choose a writable location")),
    # ---------------------------------------------------------------- stage two's cache
    Case("data length changed", "the cache has 50 rows, --data now 40",
         lambda t, c: train(c, t, n=40), 2,
         ("--data has 40 samples", "covers 50", "pass the data set the cache was computed from"),
         stage="train"),
    Case("store of another task", "--task regression on a classification cache",
         lambda t, c: train(c, t, "--task", "regression"), 2, ("--task regression but the cache", "drop --task"),
         stage="train"),
    Case("student output width", "a 7-class student, a 10-class cache",
         lambda t, c: train(c, t, "--student-arg", "num_classes=7"), 2,
         ("outputs 7 values per sample", "--student-arg num_classes=10"), stage="train"),
    Case("--beta without features", "--beta 1 on a cache with no features",
         lambda t, c: train(c, t, "--beta", "1", "--student-features", "body"), 2,
         ("--beta 1.0", "--features LAYER"), stage="train"),
    Case("truncated manifest", "manifest.json cut in half",
         lambda t, c: train(damaged(c, t, truncate("manifest.json")), t), 1,
         ("manifest.json is not valid JSON", "precompute ... --force"), stage="train"),
    Case("shard listed but missing", "soft_labels/part-00001.parquet deleted",
         lambda t, c: train(damaged(c, t, lambda r: (r / "soft_labels/part-00001.parquet").unlink()), t),
         65, ("part-00001.parquet", "missing", "kdcache verify"), stage="train"),
    Case("unknown format version", 'manifest format "kdcache/99"',
         lambda t, c: train(damaged(c, t, edit_manifest(lambda d: d.update(format="kdcache/99"))), t),
         1, ("kdcache/99", "Upgrade"), stage="train"),
    Case("manifest lacks a field", "manifest without num_rows",
         lambda t, c: train(damaged(c, t, edit_manifest(lambda d: d.pop("num_rows"))), t),
         1, ("manifest lacks 'num_rows'", "recompute it"), stage="train"),
    Case("--cache not a store", "an empty folder",
         lambda t, c: (t / "empty").mkdir() or train(t / "empty", t), 1,
         ("manifest.json not found", "--out of a finished"), stage="train"),
    Case("--cache incomplete", "_run.json but no manifest (a killed precompute)",
         lambda t, c: train(damaged(c, t, lambda r: (r / "manifest.json").unlink()), t), 1,
         ("incomplete", "rerun"), stage="train"),
    Case("unlabeled --eval-data", "--eval-data whose items carry no labels",
         lambda t, c: train(c, t, "--eval-data", DATA, "--eval-data-arg", "labels=false"), 2,
         ("--eval-data", "no labels", "labeled split"), stage="train"),
    Case("unknown student layer", "--student-features nosuch",
         lambda t, c: train(c, t, "--beta", "0.5", "--student-features", "nosuch"), 2,
         ("'nosuch'", "named_modules(): body"), stage="train", features=True),
    Case("finished run, other settings", "train --out holds a finished run at lr 1e-3; now 5e-3",
         lambda t, c: (train_once(c, t), train(c, t, "--lr", "5e-3"))[1], 2,
         ("lr: 0.001 -> 0.005", "another --out"), stage="train-finished"),
    Case("checkpoints of other settings", "a killed run's checkpoint at lr 1e-3; now 5e-3",
         lambda t, c: (killed_after_epoch_1(c, t), train(c, t, "--lr", "5e-3", "--epochs", "2"))[1],
         2, ("checkpoints", "lr: 0.001 -> 0.005", "another --out"), stage="train"),
    Case("flipped byte in a Parquet shard", "one bit of part-00001.parquet flipped",
         lambda t, c: train(damaged(c, t, flip("soft_labels/part-00001.parquet", 0.4)), t), 65,
         ("part-00001.parquet does not match the checksum", "kdcache verify"), stage="train"),
    Case("flipped byte in a feature chunk", "one bit of features.zarr/c/0/0 flipped",
         lambda t, c: train(damaged(c, t, flip("features.zarr/c/0/0")), t, "--beta", "1",
                            "--student-features", "body"), 65,
         ("features.zarr/c/0/0 does not match the checksum", "kdcache verify"), stage="train",
         features=True),
    Case("eval budget below one token", "--eval-logits-mb 0.0001 at V = 64 (one token: 256 B)",
         lambda t, c: lm_train(t, "--eval-logits-mb", "0.0001"), 2,
         ("--eval-logits-mb 0.0001", "less than one token", "raise it"), stage="train"),
    Case("forced fused head not found", "--fused-head with a student exposing no output layer",
         lambda t, c: lm_train(t, "--fused-head"), 2,
         ("--fused-head", "tests.toy_models:ToyCausalLM", "no output layer", "drop --fused-head"),
         stage="train"),
    Case("head wider than the vocabulary", "a declared output layer of 65 for a 64-token store",
         lambda t, c: lm_train(t, student="tests.toy_models:OddHeadLM"), 2,
         ("65 outputs", "vocabulary is 64", "--no-fused-head"), stage="train"),
    # ---------------------------------------------------------------- kdcache.text_dataset
    Case("text file of another format", "a .csv file as --data-arg path",
         lambda t, c: text_pre(t, file="docs.csv"), 2,
         ("docs.csv", "not a .jsonl, .json, .parquet or .arrow file", "convert it")),
    Case("missing text field", "text_field=body in rows of {text, id}",
         lambda t, c: text_pre(t, "text_field=body"), 2,
         ("text_field='body'", "has id, text", "name the right field")),
    Case("missing messages field", "messages_field=turns in rows of {messages}",
         lambda t, c: text_pre(t, "messages_field=turns", file="chats.jsonl"), 2,
         ("messages_field='turns'", "has messages", "name the right field")),
    Case("tokenizer folder without a tokenizer", "tokenizer= an empty folder",
         lambda t, c: text_pre(t, f"tokenizer={t / 'empty'}"), 2,
         ("empty'", "is not a tokenizer folder", "tokenizer.save_pretrained")),
    Case("chat data, no chat template", "messages with a tokenizer saved without a template",
         lambda t, c: text_pre(t, "messages_field=messages", file="chats.jsonl", template=False),
         2, ("tokenizer=", "has no chat template", "save the tokenizer with one")),
    Case("block size over the maximum", "block_size=4096 with model_max_length 128",
         lambda t, c: text_pre(t, "block_size=4096"), 2,
         ("block_size=4096", "model_max_length 128", "block_size <= 128")),
    Case("block size over the teacher's positions", "block_size=64 for a 32-position Llama",
         lambda t, c: text_pre(t, "block_size=64", teacher=short_llama(t)), 2,
         ("block_size=64", "--teacher's maximum of 32 positions", "max_position_embeddings",
          "block_size <= 32")),
    Case("text data not the cache's", "the JSONL file with one byte changed",
         lambda t, c: text_other_data(t), 2,
         ("--data does not match the cache", "--ignore-fingerprint"), stage="train"),
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "store"
    toy_precompute(out, data_args={"n": 50})
    return out


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("fcache") / "store"
    toy_precompute(out, data_args={"n": 50}, features="body")
    return out


def nothing_complete(case: Case, tmp: Path, cli) -> None:
    """What a failed command left must not pass for finished work."""
    if case.stage == "train":
        assert not (tmp / "student" / "summary.json").exists()
        return
    if case.stage == "train-finished":  # the finished run is left as it was
        summary = json.loads((tmp / "student" / "summary.json").read_text())
        assert summary["settings"]["lr"] == 1e-3
        return
    store = tmp / "store"
    if case.name == "--out of other settings":  # the old store stays as it was, complete
        assert cli("verify", store).exit_code == 0
        return
    assert not (store / "manifest.json").exists()
    assert cli("verify", store).exit_code != 0


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.xfail(reason=c.xfail, strict=True)) if c.xfail else c
     for c in CASES],
    ids=[c.name for c in CASES],
)  # fmt: skip
def test_bad_input(tmp_path, cli, cache, feature_cache, fault_row, case):
    source = feature_cache if case.features else cache
    args = [str(a) for a in case.build(tmp_path, source)]
    res = cli(*args)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    fault_row(
        kind="bad input",
        case=case.name,
        fault=case.fault,
        seen=" / ".join(lines) or "(nothing)",
        exit=str(res.exit_code),
        recovery="fix the input as the message says",
    )
    if case.warning:
        assert res.exit_code == 0, res.stderr
        # One line, whatever its wording: the logger prints "kdcache: MESSAGE".
        assert len(lines) == 1 and lines[0].startswith("kdcache: "), res.stderr
        assert all(n in lines[0] for n in case.needles), res.stderr
        return
    assert res.exit_code == case.exit, res.stderr
    assert_one_line_error(res.stderr, *case.needles)
    nothing_complete(case, tmp_path, cli)
