"""A third-party codec through the `kdcache.codecs` entry-point group: a distribution installed
into a temporary folder (its package and its .dist-info with entry_points.txt, as pip lays them
out) is found by name, writes a store, reads it back and trains. Real processes: plug-ins load
once per process, when the codec names are first needed (the CLI's --codec choices)."""

from __future__ import annotations

import json
import os
import subprocess

from tests.conftest import DATA, REPO, TEACHER, cli_args, kdcache_cmd

PLUGIN = '''
from kdcache.storage.codecs import register
from kdcache.storage.codecs.dense import Dense


@register
class HalfDense(Dense):
    """Every class's logit, the dense codec's way, under its own name."""

    name = "acme-dense"
'''


def install(site) -> None:
    (site / "acme_codec").mkdir(parents=True)
    (site / "acme_codec" / "__init__.py").write_text(PLUGIN)
    info = site / "acme_codec-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-codec\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kdcache.codecs]\nacme = acme_codec\n")
    (info / "RECORD").write_text("")


def run(*args, site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    return subprocess.run(kdcache_cmd(*args), cwd=REPO, env=env, capture_output=True, text=True)


def test_a_codec_from_an_installed_distribution_writes_reads_and_trains(tmp_path):
    site = tmp_path / "site-packages"
    install(site)
    store, student = tmp_path / "store", tmp_path / "student"
    res = run(*cli_args(store, "--codec", "acme-dense"), site=site)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["soft_labels"]["codec"] == "acme-dense"
    res = run("inspect", store, "--json", site=site)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["codec"] == "acme-dense"
    assert run("verify", store, site=site).returncode == 0
    res = run(
        "train", "--cache", store, "--student", TEACHER, "--student-arg", "seed=3", "--data", DATA, "--data-arg", "n=50",
        "--epochs", "3", "--lr", "1e-2", "--device", "cpu", "--out", student, "--quiet", site=site,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = (student / "metrics.csv").read_text().splitlines()
    soft = [float(r.split(",")[rows[0].split(",").index("soft_loss")]) for r in rows[1:]]
    assert len(soft) == 3 and soft[0] > soft[-1] > 0, soft  # the student learns its soft labels

    # Without the distribution the name is unknown, and the store says which codec it needs.
    res = run("inspect", store, site=tmp_path / "empty")
    assert res.returncode != 0 and "acme-dense" in res.stderr and "Traceback" not in res.stderr
