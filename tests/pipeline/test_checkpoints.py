"""Teacher and student weights from files: a file torch cannot load is one line naming it and the
flag that gave it, and a teacher with random initial weights is refused unless asked for."""

from __future__ import annotations

import io
import json
import os
import re
import zipfile

import pytest
import torch

from tests.conftest import assert_one_line_error, cli_args
from tests.toy_models import ToyNet


def _pickled_module() -> bytes:
    buf = io.BytesIO()
    torch.save(ToyNet(), buf)
    return buf.getvalue()


def _state(**kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(ToyNet(**kwargs).state_dict(), buf)
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    return buf.getvalue()


GARBAGE = {
    "random": (lambda: os.urandom(2000), "not a state dict, TorchScript or torch.export file"),
    "empty": (lambda: b"", "not a state dict, TorchScript or torch.export file"),
    "text": (lambda: b"epoch 3 loss 0.1\n", "not a state dict, TorchScript or torch.export"),
    "zip": (_zip, "not a state dict, TorchScript or torch.export file"),
    "truncated": (lambda: _state()[:-100], "not a state dict, TorchScript or torch.export"),
    "whole-model": (_pickled_module, "holds pickled Python objects"),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_checkpoint_is_one_line_naming_the_file(tmp_path, cli, case):
    make, reason = GARBAGE[case]
    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(make())
    res = cli(*cli_args(tmp_path / "s", "--checkpoint", ckpt))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, f"--checkpoint '{ckpt}' cannot be loaded", reason)
    assert not (tmp_path / "s" / "manifest.json").exists()


def online_args(tmp_path, *extra) -> list:
    args = ["train", "--teacher", "tests.toy_models:ToyNet", "--student", "tests.toy_models:ToyNet"]
    args += ["--student-arg", "dim=8", "--data", "tests.toy_models:ToyData", "--data-arg", "n=32"]
    return args + ["--out", tmp_path / "o", "--epochs", "1", "--device", "cpu", "--quiet", *extra]


def test_teacher_checkpoint_errors_name_the_teacher_checkpoint_flag(tmp_path, cli):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 64)
    res = cli(*online_args(tmp_path, "--teacher-checkpoint", garbage))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, f"--teacher-checkpoint '{garbage}' cannot be loaded")
    other = tmp_path / "wide.pt"
    other.write_bytes(_state(dim=32))  # a state dict of another width: does not fit
    res = cli(*online_args(tmp_path, "--teacher-checkpoint", other))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, f"--teacher-checkpoint '{other}' does not fit --teacher")
    assert "--checkpoint '" not in res.stderr
    # The line names what differs (torch's own message spends a line per key).
    assert re.search(r"body\.\S+ has shape \[128\] in the file, \[64\] in the model", res.stderr)
    assert "the arguments it was trained with" in res.stderr


def test_evaluate_names_the_damaged_model_file(tmp_path, cli):
    assert cli(*online_args(tmp_path)).exit_code == 0
    (tmp_path / "o" / "model.pt").write_bytes(b"garbage")
    res = cli("evaluate", "--checkpoint", tmp_path / "o", "--data", "tests.toy_models:ToyData",
              "--data-arg", "n=20", "--device", "cpu")  # fmt: skip
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, f"--checkpoint '{tmp_path / 'o' / 'model.pt'}' cannot be")


def test_a_random_teacher_is_refused_unless_asked_for(tmp_path, cli):
    unseeded = ["--teacher-arg", "seed=null"]
    res = cli(*cli_args(tmp_path / "s", *unseeded))
    assert res.exit_code == 2
    assert_one_line_error(
        res.stderr, "--teacher tests.toy_models:ToyNet has random initial weights",
        "--checkpoint FILE", "--random-teacher",
    )  # fmt: skip
    assert not (tmp_path / "s").exists()
    res = cli(*cli_args(tmp_path / "s", *unseeded, "--random-teacher"))
    assert res.exit_code == 0, res.stderr
    # A spec that seeds itself (or loads trained weights) builds the same weights every time.
    res = cli(*cli_args(tmp_path / "seeded"))
    assert res.exit_code == 0 and "random initial weights" not in res.stderr
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(_state(seed=None))
    assert cli(*cli_args(tmp_path / "file", *unseeded, "--checkpoint", ckpt)).exit_code == 0
    manifest = json.loads((tmp_path / "file" / "manifest.json").read_text())
    assert manifest["teacher"]["checkpoint"] == str(ckpt)


def test_the_random_teacher_check_leaves_the_global_generator_alone(tmp_path):
    from kdcache.pipeline.models import random_init

    model = ToyNet(seed=None)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    assert random_init("tests.toy_models:ToyNet", {"seed": None}, model)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not random_init("tests.toy_models:ToyNet", {}, ToyNet())


def test_an_online_random_teacher_gets_a_warning(tmp_path, cli):
    res = cli(*online_args(tmp_path, "--teacher-arg", "seed=null"))
    assert res.exit_code == 0, res.stderr
    assert "warning: --teacher tests.toy_models:ToyNet has random initial weights" in res.stderr
