"""`kdcache train` and `kdcache evaluate` from the command line: results, errors, several students,
and the student process never touching the teacher."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, assert_one_line_error, toy_precompute
from tests.toy_teacher_only import IsolatedTeacher

TEACHER_MODULE = "tests.toy_teacher_only"
N = 128


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache made by a teacher from a test-only module, from a checkpoint that is then deleted."""
    root = tmp_path_factory.mktemp("cli-train")
    ckpt = root / "teacher.pt"
    torch.save(IsolatedTeacher(seed=3).state_dict(), ckpt)
    toy_precompute(
        root / "cache", teacher=f"{TEACHER_MODULE}:IsolatedTeacher", checkpoint=str(ckpt),
        data_args={"n": N}, shard_rows=32, features="body", top_k=4,
    )  # fmt: skip
    ckpt.unlink()  # the student side must not need it
    return str(root / "cache")


def train_args(cache: str | None, out, *extra: str) -> list[str]:
    args = ["train", "--student", "tests.toy_models:ToyNet", "--student-arg", "dim=8"]
    args += ["--data", "tests.toy_models:ToyData", "--data-arg", f"n={N}"]
    args += ["--eval-data", "tests.toy_models:ToyData", "--eval-data-arg", "n=40"]
    args += ["--out", str(out), "--epochs", "2", "--batch-size", "32", "--device", "cpu"]
    return args + (["--cache", cache] if cache else []) + ["--quiet", *extra]


def test_train_rerun_and_evaluate(tmp_path, cli, cache):
    out = tmp_path / "s"
    res = cli(*train_args(cache, out, "--beta", "0.5", "--student-features", "body"))
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith("trained s: eval_accuracy ") and str(out) in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["beta"] == 0.5 and summary["settings"]["temperature"] == 4.0

    res = cli(*train_args(cache, out, "--beta", "0.5", "--student-features", "body"))
    assert res.exit_code == 0 and res.stdout.startswith("already trained: ")

    res = cli("evaluate", "--checkpoint", out, "--data", "tests.toy_models:ToyData",
              "--data-arg", "n=40", "--cache", cache, "--device", "cpu", "--json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)
    final = summary["final"]
    assert got["n"] == 40 and got["name"] == "s"
    for key, want in (("accuracy", "eval_accuracy"), ("ece", "eval_ece"), ("loss", "eval_loss")):
        assert got[key] == pytest.approx(final[want], abs=1e-9)
    assert got["agreement"] == pytest.approx(final["agreement"], abs=1e-9)

    res = cli("evaluate", "--checkpoint", out, "--data", "tests.toy_models:ToyData")
    assert res.exit_code == 0 and "accuracy" in res.stdout and "agreement  -" in res.stdout


def test_hard_label_run_gives_a_model_precompute_accepts(tmp_path, cli):
    res = cli(*train_args(None, tmp_path / "t", "--log-json"))
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["status"] == "done" and doc["final"]["agreement"] is None
    res = cli(
        "precompute", "--teacher", "tests.toy_models:ToyNet", "--teacher-arg", "dim=8",
        "--checkpoint", tmp_path / "t" / "model.pt", "--data", "tests.toy_models:ToyData",
        "--data-arg", "n=20", "--out", tmp_path / "c", "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (("--alpha", "2"), ("--alpha 2.0", "[0, 1]")),
        (("--temperature", "0"), ("--temperature 0.0",)),
        (("--beta", "1"), ("--beta", "--student-features")),
        (("--student-arg", "num_classes=3"), ("outputs 3", "num_classes=10")),
        (("--data-arg", "seed=4"), ("fingerprint", "--ignore-fingerprint")),
        (("--epochs", "0"), ("--epochs 0",)),
    ],
)
def test_bad_options_are_one_line_errors_before_training(tmp_path, cli, cache, extra, needles):
    out = tmp_path / "o"
    res = cli(*train_args(cache, out, *extra))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, *needles)
    assert not (out / "metrics.csv").exists()


def test_missing_options_and_bad_checkpoint_folder(tmp_path, cli, cache):
    res = cli("train", "--cache", cache, "--data", "tests.toy_models:ToyData")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "--student", "--out")
    res = cli("evaluate", "--checkpoint", tmp_path, "--data", "tests.toy_models:ToyData")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "no summary.json")


STUDENTS = """
student = "tests.toy_models:ToyNet"
data = "tests.toy_models:ToyData"
data_args = {{n = {n}}}
eval_data = "tests.toy_models:ToyData"
eval_data_args = {{n = 40}}
cache = "{cache}"
epochs = 3
batch_size = 32
device = "cpu"

[[students]]
name = "t2"
temperature = 2.0
student_args = {{dim = 8}}

[[students]]
name = "hard"
alpha = 0.0
"""


def test_several_students_from_one_toml(tmp_path, cli, cache):
    toml = tmp_path / "students.toml"
    toml.write_text(STUDENTS.format(n=N, cache=cache))
    res = cli("train", "--config", toml, "--out", tmp_path / "out", "--epochs", "1", "--quiet")
    assert res.exit_code == 0, res.stderr
    assert [line.split(":")[0] for line in res.stdout.splitlines()] == [
        "trained t2",
        "trained hard",
    ]
    t2 = json.loads((tmp_path / "out" / "t2" / "summary.json").read_text())["settings"]
    hard = json.loads((tmp_path / "out" / "hard" / "summary.json").read_text())["settings"]
    assert (t2["temperature"], t2["alpha"], t2["student_args"]) == (2.0, 0.9, {"dim": 8})
    assert (hard["temperature"], hard["alpha"], hard["student_args"]) == (4.0, 0.0, {})
    assert t2["epochs"] == hard["epochs"] == 1  # the command line beats the file
    assert t2["out"] == str(tmp_path / "out" / "t2")


def test_seeds_train_each_student_once_per_seed(tmp_path, cli, cache):
    toml = tmp_path / "students.toml"
    toml.write_text("seeds = [0, 5]\n" + STUDENTS.format(n=N, cache=cache))
    out = tmp_path / "out"
    res = cli("train", "--config", toml, "--out", out, "--epochs", "1", "--only", "hard",
              "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["hard-seed0", "hard-seed5"]
    runs = {p.name: json.loads((p / "summary.json").read_text()) for p in out.iterdir()}
    assert {n: s["settings"]["seed"] for n, s in runs.items()} == {"hard-seed0": 0, "hard-seed5": 5}
    # other seeds: other data orders, so other weights and losses
    losses = {n: s["final"]["eval_loss"] for n, s in runs.items()}
    assert losses["hard-seed0"] != losses["hard-seed5"]
    # --seeds beats the file's list; --only takes one run by its full name
    res = cli("train", "--config", toml, "--out", out, "--epochs", "1", "--seeds", "7,0",
              "--only", "t2-seed7", "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert (out / "t2-seed7" / "summary.json").exists() and not (out / "t2-seed0").exists()


@pytest.mark.parametrize(
    ("args", "head", "needle"),
    [
        (["--seeds", "0,x"], "", "distinct non-negative integers"),
        (["--seeds", "1,1"], "", "distinct non-negative integers"),
        (["--seeds", "0,1", "--seed", "3"], "", "drop --seed"),
        ([], "seeds = []\n", "distinct non-negative integers"),
    ],
)
def test_bad_seeds(tmp_path, cli, cache, args, head, needle):
    toml = tmp_path / "students.toml"
    toml.write_text(head + STUDENTS.format(n=N, cache=cache))
    res = cli("train", "--config", toml, "--out", tmp_path / "out", *args)
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, needle)
    assert not (tmp_path / "out").exists()


def test_a_bad_later_student_fails_before_the_first_trains(tmp_path, cli, cache):
    toml = tmp_path / "students.toml"
    bad = '[[students]]\nname = "wide"\nstudent_args = {num_classes = 7}\n'
    toml.write_text(STUDENTS.format(n=N, cache=cache) + bad)
    res = cli("train", "--config", toml, "--out", tmp_path / "out", "--quiet")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "outputs 7 values", "num_classes=")
    assert not (tmp_path / "out" / "t2").exists()  # nothing trained, nothing written


def test_parallel_students_in_subprocesses(tmp_path, cache):
    """--parallel 2 trains two students at once: the spans of their forwards overlap in time."""
    toml = tmp_path / "students.toml"
    stamps = {name: tmp_path / f"{name}.times" for name in ("t2", "hard")}
    text = STUDENTS.format(n=N, cache=cache).replace("student_args = {dim = 8}\n", "")
    for name, path in stamps.items():
        text = text.replace(
            f'name = "{name}"\n',
            f'name = "{name}"\nstudent_args = {{sleep = 0.05, stamp_file = "{path}"}}\n',
        )
    toml.write_text(text)
    cmd = [sys.executable, "-c", "from kdcache.pipeline.cli import main; main()", "train"]
    cmd += ["--config", str(toml), "--out", str(tmp_path / "out"), "--parallel", "2", "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    for name in ("t2", "hard"):
        summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
        assert summary["name"] == name and summary["epochs"] == 3
    spans = {n: [float(t) for t in p.read_text().split()] for n, p in stamps.items()}
    assert all(len(times) >= 12 for times in spans.values())  # 3 epochs of 4 batches each
    (a0, a1), (b0, b1) = ((min(t), max(t)) for t in spans.values())
    assert max(a0, b0) < min(a1, b1), spans  # one ran while the other did: not one after another


@pytest.mark.parametrize(
    ("tables", "needle"),
    [
        ('[[students]]\nname = "a"\n[[students]]\nname = "a"\n', "unique name"),
        ("[[students]]\nalpha = 0.5\n", "unique name"),
        ('[[students]]\nname = "a"\nout = "x"\n', "OUT/a"),
        ('[[students]]\nname = "a"\nalhpa = 0.5\n', "unknown option"),
    ],
)
def test_bad_students_toml(tmp_path, cli, cache, tables, needle):
    toml = tmp_path / "s.toml"
    toml.write_text(STUDENTS.format(n=N, cache=cache).split("[[students]]")[0] + tables)
    res = cli("train", "--config", toml, "--out", tmp_path / "out")
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, needle)
    assert not (tmp_path / "out").exists()


PROBE = """
import json, sys
from kdcache.pipeline.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def test_student_process_never_imports_the_teacher(tmp_path, cache):
    args = train_args(cache, tmp_path / "s", "--beta", "0.5", "--student-features", "body")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["code"] == 0, proc.stderr
    assert (tmp_path / "s" / "summary.json").exists()
    assert "kdcache.stages.train.trainer" in doc["modules"] and "tests.toy_models" in doc["modules"]
    assert TEACHER_MODULE not in doc["modules"]
