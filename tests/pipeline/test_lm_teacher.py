"""The committed LM teacher (checkpoints/lm-teacher.*): its sha256, size and tokenizer are checked
before it is used, it loads into the size it declares, and `export` -> `restore` gives back the
very weights a `kdcache train` folder held."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from kdcache.pipeline.examples import lm_teacher, lm_teacher_export
from kdcache.pipeline.examples.lm import gpt2
from kdcache.stages.train.run_folder import RunFolder
from kdcache.storage.errors import UsageError
from tests.conftest import REPO, assert_one_line_error, kdcache_cmd

CARD = REPO / "checkpoints" / "lm-teacher.json"
DOC = json.loads(CARD.read_text())
ARGS = DOC["summary"]["student_args"]
TEXT = {k: DOC["summary"]["settings"]["data_args"][k] for k in lm_teacher.TEXT_KEYS}


@pytest.fixture
def copied(tmp_path):
    """The card and its weights, copied where a test may spoil them."""
    shutil.copy(CARD, tmp_path / CARD.name)
    shutil.copy(CARD.parent / DOC["weights"], tmp_path / DOC["weights"])
    return tmp_path / CARD.name, tmp_path / DOC["weights"]


@pytest.fixture
def same_tokenizer(monkeypatch):
    """This machine's corpus and tokenizer digests taken as the card's (training a 4096-id
    tokenizer costs ~20 s: the slow test below checks the real ones)."""
    monkeypatch.setattr(lm_teacher, "tokenizer_digests", lambda vocab, max_bytes: DOC["text"])


def restore_cli(card, out, *args: str) -> subprocess.CompletedProcess:
    kv = [f"--student-arg={k}={v}" for k, v in ARGS.items()]
    kv += [f"--data-arg={k}={v}" for k, v in TEXT.items()]
    cmd = [sys.executable, "-m", "kdcache.pipeline.examples.lm_teacher", "restore"]
    cmd += ["--card", str(card), "--out", str(out), *kv, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_committed_weights_match_their_card_and_load_into_the_declared_size():
    path = lm_teacher.checked_weights(CARD, DOC)
    data = path.read_bytes()
    assert len(data) == DOC["bytes"] <= 10_000_000 and not data.startswith(b"version https://")
    model = lm_teacher.load_weights(path, ARGS)
    assert sum(p.numel() for p in model.parameters()) == DOC["summary"]["num_params"]
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    assert ARGS["vocab_size"] == TEXT["vocab"] and ARGS["n_positions"] == TEXT["block"]
    # Not a seed's fresh weights: trained ones, in issue 24's regime (<= 4.0 nats/token).
    assert not torch.equal(model.transformer.wte.weight, gpt2(**ARGS).transformer.wte.weight)
    assert DOC["summary"]["final"]["eval_loss"] <= 4.0


def test_a_tampered_file_is_one_line_naming_it_and_the_fix(copied, tmp_path):
    card, weights = copied
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    done = restore_cli(card, tmp_path / "teacher")
    assert done.returncode == 2
    assert_one_line_error(done.stderr, str(weights), "sha256", "git checkout --")
    assert not (tmp_path / "teacher").exists()


def test_a_git_lfs_pointer_or_a_missing_file_is_refused(copied):
    card, weights = copied
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(UsageError, match="Git LFS pointer"):
        lm_teacher.checked_weights(card, DOC)
    weights.unlink()
    with pytest.raises(UsageError, match="do not exist: restore it with `git checkout"):
        lm_teacher.checked_weights(card, DOC)


def test_other_sizes_text_settings_or_tokenizer_are_refused(same_tokenizer, monkeypatch, tmp_path):
    out = str(tmp_path / "t")
    with pytest.raises(UsageError, match=r"not .*n_layer=1.*LM_TEACHER=train"):
        lm_teacher.restore(CARD, out, {**ARGS, "n_layer": 1}, TEXT)
    with pytest.raises(UsageError, match=r"trained on text .*vocab=512.*LM_TEACHER=train"):
        lm_teacher.restore(CARD, out, ARGS, {**TEXT, "vocab": 512})
    other = {**DOC["text"], "tokenizer_sha256": "f" * 64, "tokenizers": "9.9"}
    monkeypatch.setattr(lm_teacher, "tokenizer_digests", lambda vocab, max_bytes: other)
    with pytest.raises(UsageError, match=r"the tokenizer here \(sha256 ffffffffffff.*9\.9") as err:
        lm_teacher.restore(CARD, out, ARGS, TEXT)
    assert "\n" not in str(err.value)


def test_restore_writes_a_finished_run_folder_once_and_spares_a_trained_one(
    same_tokenizer, tmp_path
):
    out = str(tmp_path / "teacher")
    assert "restored" in lm_teacher.restore(CARD, out, ARGS, TEXT)
    folder = RunFolder(out)
    assert folder.summary() == DOC["summary"] and len(folder.rows()) == len(DOC["metrics"])
    state = torch.load(folder.model_url, weights_only=True)
    want = lm_teacher.load_weights(lm_teacher.checked_weights(CARD, DOC), ARGS).state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    assert "is in" in lm_teacher.restore(CARD, out, ARGS, TEXT)  # a rerun: nothing written
    (tmp_path / "teacher" / lm_teacher.MARKER).unlink()  # now it looks trained here
    with pytest.raises(UsageError, match="holds a teacher trained here.*LM_TEACHER=train"):
        lm_teacher.restore(CARD, out, ARGS, TEXT)


@pytest.mark.slow
def test_this_machines_corpus_and_tokenizer_are_the_committed_teachers(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_DATA_DIR", str(tmp_path))
    assert lm_teacher.tokenizer_digests(TEXT["vocab"], TEXT["max_bytes"]) == DOC["text"]


def test_export_then_restore_gives_back_a_trained_folders_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_DATA_DIR", str(tmp_path / "data"))
    size = {"vocab_size": 300, "n_positions": 16, "n_layer": 1, "n_embd": 16, "n_head": 2}
    text = {"vocab": 300, "block": 16, "max_bytes": 100_000}
    args = [f"--student-arg={k}={v}" for k, v in size.items()]
    args += [f"--data-arg={k}={v}" for k, v in {**text, "max_tokens": 2000}.items()]
    args += [f"--eval-data-arg={k}={v}" for k, v in {**text, "max_tokens": 500}.items()]
    run = tmp_path / "trained"
    cmd = kdcache_cmd("train", "--config", REPO / "configs/lm/teacher.toml", "--out", run, *args)
    done = subprocess.run([*cmd, "--epochs", "1", "--device", "cpu"], cwd=REPO, timeout=300)
    assert done.returncode == 0
    card = tmp_path / "ck" / "tiny.json"
    doc = lm_teacher_export.export(str(run), card, "test")
    assert doc["sha256"] == lm_teacher.sha256_of(card.with_suffix(".safetensors"))
    assert doc["summary"] == RunFolder(str(run)).summary()
    assert (run / lm_teacher.MARKER).exists()  # the trained folder now is the committed one
    out = tmp_path / "restored"
    assert "restored" in lm_teacher.restore(card, str(out), size, text)  # real digests here
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (run, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "metrics.csv").read_text() == (run / "metrics.csv").read_text()
