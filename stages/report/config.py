"""The settings of `kdcache report`: where the job's runs are, and the targets its sections judge
the measurements against (given by the job, e.g. the Makefile: nothing project-specific here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdcache.stages.common.config import Checked
from kdcache.storage.fsio import open_location
from kdcache.storage.options import option, option_problems


@dataclass(kw_only=True, frozen=True)
class ReportConfig(Checked):
    runs: str = option("runs", "Folder of the job's runs.")
    out: str | None = option(
        None, "Markdown file (default RUNS/report.md); JSON and PNGs go beside it."
    )
    teacher: str | None = option(
        None, "The teacher's `kdcache train` folder (default RUNS/teacher)."
    )
    students: str | None = option(
        None, "Folder with one folder per student (default RUNS/students)."
    )
    lm: str | None = option(
        None,
        "The language-model job's runs: teacher/ and students/ (default RUNS/lm; skipped when "
        "absent).",
    )
    plots: bool = option(True, "Skip the PNGs (no matplotlib needed).", flag_name="--no-plots")
    # Recomputing teacher agreement on the eval data loads the models.
    agreement: bool = option(
        True, "Do not load the models to measure teacher agreement.", flag_name="--no-agreement"
    )
    # Timing needs the models too: --no-agreement skips it as well.
    deploy: bool = option(
        True, "Do not time the models (CPU latency, int8 copies).", flag_name="--no-deploy"
    )
    # The job's own targets, judged in the LM section's headline (the Makefile gives its job's).
    lm_near_online: float | None = option(
        None,
        "LM section's target: the sampled-cache student within this many nats/token of the "
        "online-KD student (default: no verdict).",
        minimum=0,
    )
    lm_over_hard: float | None = option(
        None,
        "LM section's target: the best cache student this many nats/token better than hard "
        "labels (default: no verdict).",
        minimum=0,
    )

    def defaults(self) -> dict:
        """RUNS/report.md, RUNS/teacher, RUNS/students and RUNS/lm for those not given (joined
        with "/" on a URL)."""
        url = "://" in self.runs
        root = self.runs.rstrip("/") if url else self.runs

        def under(name: str) -> str:
            return f"{root}/{name}" if url else str(Path(root) / name)

        return {
            "out": self.out or under("report.md"),
            "teacher": self.teacher or under("teacher"),
            "students": self.students or under("students"),
            "lm": self.lm or under("lm"),
        }

    def problems(self) -> list[str]:
        out = option_problems(self)
        d = self.defaults()
        # Either job alone makes a report: the classifier job's students or the LM job's runs.
        if not open_location(d["students"]).is_dir() and not open_location(d["lm"]).is_dir():
            out.append(
                f"--students {d['students']}: no such folder (nor --lm {d['lm']}); train "
                "students first (`kdcache train --config ... --out FOLDER`)"
            )
        return out
