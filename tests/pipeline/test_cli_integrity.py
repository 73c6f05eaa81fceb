"""Integrity on read from the command line: `train`, `evaluate` and `inspect --deep` stop at a
damaged store file with exit 65 and one line naming the file, the store and `kdcache verify`;
`--no-verify-reads` opts out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, toy_precompute

N = 128


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-integrity") / "cache"
    toy_precompute(out, data_args={"n": N}, shard_rows=32, features="body", top_k=4)
    return out


@pytest.fixture
def damaged(store, tmp_path):
    """A copy of the store with one byte flipped in the given file."""

    def make(key: str) -> Path:
        root = Path(shutil.copytree(store, tmp_path / "damaged"))
        data = bytearray((root / key).read_bytes())
        data[len(data) // 2] ^= 0x01
        (root / key).write_bytes(bytes(data))
        return root

    return make


def train_args(cache, out, *extra) -> list[str]:
    args = ["train", "--student", "tests.toy_models:ToyNet", "--student-arg", "dim=8"]
    args += ["--data", "tests.toy_models:ToyData", "--data-arg", f"n={N}", "--cache", str(cache)]
    args += ["--out", str(out), "--epochs", "1", "--batch-size", "32", "--device", "cpu"]
    return args + ["--beta", "1", "--student-features", "body", "--quiet", *extra]


def damaged_line(stderr: str, root: Path, key: str) -> None:
    assert_one_line_error(
        stderr, f"{root / key} does not match the checksum", f"of {root}", f"kdcache verify {root}"
    )


@pytest.mark.parametrize(
    "key, workers",
    [
        ("features.zarr/c/0/0", "0"),
        ("soft_labels/part-00001.parquet", "0"),
        # Raised in a DataLoader worker, re-raised with the worker's traceback: still one line.
        ("soft_labels/part-00001.parquet", "1"),
    ],
)
def test_train_stops_at_a_flipped_byte(cli, damaged, tmp_path, key, workers):
    root = damaged(key)
    res = cli(*train_args(root, tmp_path / "s", "--num-workers", workers))
    assert res.exit_code == 65
    damaged_line(res.stderr, root, key)
    assert "ArrowInvalid" not in res.stderr
    assert not (tmp_path / "s" / "summary.json").exists()


def test_no_verify_reads_trains_on_the_damaged_chunk(cli, damaged, tmp_path):
    root = damaged("features.zarr/c/0/0")
    res = cli(*train_args(root, tmp_path / "s", "--no-verify-reads"))
    assert res.exit_code == 0, res.stderr
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["settings"]["verify_reads"] is False


def test_evaluate_checks_the_cache_it_reads(cli, store, damaged, tmp_path):
    assert cli(*train_args(store, tmp_path / "s")).exit_code == 0
    root = damaged("soft_labels/part-00000.parquet")
    args = ["evaluate", "--checkpoint", tmp_path / "s", "--data", "tests.toy_models:ToyData"]
    args += ["--data-arg", "n=40", "--cache", root, "--device", "cpu"]
    res = cli(*args)
    assert res.exit_code == 65
    damaged_line(res.stderr, root, "soft_labels/part-00000.parquet")


def test_inspect_deep_reads_and_checks_every_file(cli, store, damaged):
    res = cli("inspect", store, "--deep", "--json")
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)
    manifest = json.loads((store / "manifest.json").read_text())
    files = len(manifest["files"]) + sum(len(s["files"]) for s in manifest["shards"])
    assert (got["rows_read"], got["files_checked"], got["nonfinite_values"]) == (N, files, 0)
    assert got["labeled_rows_read"] == manifest["stats"]["labeled_rows"]

    root = damaged("features.zarr/c/3/0")
    assert cli("inspect", root).exit_code == 0  # the summary reads the manifest alone
    res = cli("inspect", root, "--deep")
    assert res.exit_code == 65
    damaged_line(res.stderr, root, "features.zarr/c/3/0")
    res = cli("inspect", root, "--deep", "--json", "--no-verify-reads")
    assert res.exit_code == 0 and json.loads(res.stdout)["files_checked"] is None


@pytest.mark.parametrize("command", ["train", "evaluate", "inspect"])
def test_the_opt_out_flag_is_generated_for_each_reader(cli, command):
    res = cli(command, "--help")
    assert "--no-verify-reads" in res.stdout
