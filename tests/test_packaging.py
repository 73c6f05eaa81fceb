"""The built wheel: one top-level name `kdcache`, and it runs next to a user's own `pipeline`,
`storage` and `stages` packages (the names ML repositories routinely use for their own code).

The wheel is built from a copy of the source (an in-tree build leaves build/ behind, whose stale
files would leak into later wheels) and installed into a fresh venv that borrows the heavy
dependencies from the project's .venv through a .pth path line instead of reinstalling them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import REPO

VERSION = metadata.version("kdcache")
MUST_SHIP = [
    "kdcache/__main__.py",
    "kdcache/storage/reader.py",
    "kdcache/stages/train/trainer.py",
    "kdcache/pipeline/cli.py",
    "kdcache/pipeline/examples/models.py",
]
# The user's own packages: import-time distinct from kdcache's layers of the same name.
USER_FILES = {
    "storage/__init__.py": "USER = True\n",
    "stages/__init__.py": "USER = True\n",
    "pipeline/__init__.py": "USER = True\n",
    "pipeline/data.py": '''
        """64 seeded samples of 8 floats, labels 0..3; every process that builds it leaves a
        marker saying which kdcache, storage and stages it saw."""

        import json
        import os
        import sys
        from pathlib import Path

        import numpy as np
        import torch

        import kdcache
        import stages
        import storage


        class MyData:
            def __init__(self):
                rng = np.random.default_rng(0)
                self.x = torch.from_numpy(rng.standard_normal((64, 8)).astype(np.float32))
                self.y = [i % 4 for i in range(64)]
                seen = {"argv0": sys.argv[0], "kdcache": kdcache.__file__,
                        "storage": storage.__file__, "stages": stages.__file__,
                        "user": storage.USER and stages.USER}
                markers = Path(__file__).resolve().parents[1] / "markers"
                markers.mkdir(exist_ok=True)
                (markers / f"{os.getpid()}.json").write_text(json.dumps(seen))

            def __len__(self):
                return len(self.x)

            def __getitem__(self, i):
                return self.x[i], self.y[i]
    ''',
    "pipeline/models.py": """
        import torch
        from torch import nn


        class Teacher(nn.Sequential):
            def __init__(self):
                torch.manual_seed(0)
                super().__init__(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


        class Student(nn.Sequential):
            def __init__(self, hidden: int = 8):
                torch.manual_seed(1)
                super().__init__(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    """,
    "jobs.toml": """
        data = "pipeline.data:MyData"
        epochs = 2
        batch_size = 16
        device = "cpu"

        [[students]]
        name = "small"
        student = "pipeline.models:Student"
        student_args = {hidden = 4}

        [[students]]
        name = "wide"
        student = "pipeline.models:Student"
        student_args = {hidden = 32}
    """,
}


def _run(cmd: list, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    # No PYTHONPATH: what the commands import must come from the venv and the current folder.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _build_wheel(src: Path, out: Path) -> Path:
    """`pip wheel` of src; without build isolation when this venv's setuptools suffices (make
    setup's torch requires setuptools>=77, as pyproject.toml does), so no index is needed."""
    try:
        isolated = int(metadata.version("setuptools").split(".")[0]) < 77
    except metadata.PackageNotFoundError:
        isolated = True
    flags = [] if isolated else ["--no-build-isolation"]
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *flags, "-q", "-w", out, src]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("kdcache-*.whl")
    return wheel


def _bin(venv_root: Path, name: str) -> Path:
    return venv_root / ("Scripts" if os.name == "nt" else "bin") / name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "kdcache"
    junk = shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "runs", "__pycache__", ".*_cache"
    )
    shutil.copytree(REPO, src, ignore=junk)
    return _build_wheel(src, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "fresh"
    venv.create(root, with_pip=True)
    python = _bin(root, "python")
    proc = _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # After the install, so pip never sees the project's editable kdcache. A plain path line is
    # appended to sys.path; the .pth files inside that folder (the editable finder) are not run.
    proc = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    site = Path(proc.stdout.strip())
    (site / "kdcache-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Installed top-level packages of the users' names (what kdcache's wheel used to ship): the
    # user's own ones in the current folder must still win, in the script and in its children.
    for name in ("pipeline", "storage", "stages"):
        (site / name).mkdir()
        (site / name / "__init__.py").write_text("USER = False\n")
    return root


def test_wheel_has_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"kdcache", f"kdcache-{VERSION}.dist-info"}
    assert set(MUST_SHIP) <= set(names)
    # pipeline/_package ships as kdcache/ itself, never a second time under kdcache/pipeline/.
    assert [n for n in names if {"tests", "bench", "_package"} & set(n.split("/"))] == []


def test_installed_kdcache_trains_from_a_users_own_pipeline_package(fresh_venv, tmp_path):
    user = tmp_path / "project"
    for rel, text in USER_FILES.items():
        (user / rel).parent.mkdir(parents=True, exist_ok=True)
        (user / rel).write_text(textwrap.dedent(text).lstrip())
    store, students = tmp_path / "store", tmp_path / "students"
    python, script = _bin(fresh_venv, "python"), _bin(fresh_venv, "kdcache")

    # Stage one through `python -m kdcache`, stage two through the console script.
    specs = ["--teacher", "pipeline.models:Teacher", "--data", "pipeline.data:MyData"]
    small = ["--shard-rows", 16, "--top-k", 2, "--device", "cpu"]  # the teacher has 4 classes
    proc = _run([python, "-m", "kdcache", "precompute", *specs, "--out", store, *small], cwd=user)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["data"]["spec"] == "pipeline.data:MyData"
    assert manifest["num_rows"] == 64

    train = ["train", "--config", "jobs.toml", "--cache", store, "--out", students]
    proc = _run([script, *train, "--parallel", 2, "--quiet"], cwd=user)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("small", "wide"):
        summary = json.loads((students / name / "summary.json").read_text())
        assert summary["name"] == name and summary["epochs"] == 2

    # One marker per process that built MyData: precompute, the train parent (it checks every
    # student before any trains) and the two --parallel children (`python -c ...`).
    seen = [json.loads(p.read_text()) for p in (user / "markers").glob("*.json")]
    launchers = sorted(Path(s["argv0"]).name for s in seen)
    assert launchers == ["-c", "-c", "__main__.py", "kdcache"], launchers
    for s in seen:
        assert s["user"] is True
        assert Path(s["storage"]).parent == user / "storage"
        assert Path(s["stages"]).parent == user / "stages"
        assert Path(s["kdcache"]).resolve().is_relative_to(fresh_venv.resolve()), s["kdcache"]


def test_python_m_kdcache_help():
    proc = _run([sys.executable, "-m", "kdcache", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: kdcache ")
    for command in ("precompute", "train", "evaluate"):
        assert f"  {command} " in proc.stdout
