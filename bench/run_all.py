"""Run every benchmark, each in its own process, and collect the tables into bench/out/.

    python -m bench.run_all [--quick] [--only bench_reader ...] [--out bench/out]

Each bench prints its tables as it finishes (its output is passed through live); at the end this
prints every target side by side and writes `results.json` (all tables, targets, notes, the
environment and the git commit) and `results.md` (the same, readable). A separate process per
bench keeps one bench's threads, caches and imports from colouring the next one's timings. A bench
that fails is reported and the others still run; the exit code is then 1. Targets are reported,
never enforced: a missed target does not fail the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Table, environment

REPO = Path(__file__).resolve().parents[1]
# bench_s3 (object storage vs local disk) is optional: it runs when its module is present.
BENCHES = (
    "bench_precompute",
    "bench_reader",
    "bench_train",
    "bench_lm",
    "bench_lm_loss",
    "bench_s3",
)


def available(names: list[str] | None) -> list[str]:
    present = [b for b in BENCHES if (REPO / "bench" / f"{b}.py").exists()]
    if not names:
        return present
    unknown = sorted(set(names) - set(present))
    if unknown:
        raise SystemExit(f"run_all: no such bench {', '.join(unknown)}; have {', '.join(present)}")
    return [b for b in present if b in names]


def run_one(name: str, flags: list[str], timeout: float) -> dict:
    """Run `python -m bench.<name> <flags> --json F`, echoing its output; returns its report."""
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", f"bench.{name}", *flags, "--json", str(out)]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines = []
        try:
            for line in proc.stdout:
                print(line, end="", flush=True)
                lines.append(line)
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        seconds = time.perf_counter() - started
        if code == 0 and out.exists():
            result = json.loads(out.read_text())
        else:
            result = {"name": name, "tables": [], "targets": [], "notes": []}
        result.update(module=name, exit_code=code, seconds=seconds)
        if code != 0:
            result["output_tail"] = "".join(lines[-40:])
        return result


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def markdown(results: list[dict], meta: dict) -> str:
    parts = [
        "# kdcache benchmarks",
        f"commit {meta['commit']}, {meta['mode']} mode, {meta['started']}; environment: "
        f"{meta['environment']}",
    ]
    summary = Table("all targets", ["bench", "ratio", "measured", "target", "met"])
    for r in results:
        for g in r["targets"]:
            met = "yes" if g["met"] else "NO"
            summary.add(r["module"], g["what"], g["value"], f"{g['op']} {g['goal']}", met)
        if r["exit_code"] != 0:
            summary.add(r["module"], "(bench failed)", "-", "-", f"exit {r['exit_code']}")
    parts.append(summary.markdown())
    for r in results:
        parts.append(f"## {r.get('name', r['module'])} ({r['module']}, {r['seconds']:.0f} s)")
        for t in r["tables"]:
            table = Table(t["title"], t["headers"])
            for row in t["rows"]:
                table.add(*row)
            parts.append(table.markdown())
        parts += [f"- {n}" for n in r["notes"]]
        if "output_tail" in r:
            parts.append("```\n" + r["output_tail"] + "```")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the kdcache benchmarks.")
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes in all)")
    p.add_argument("--tiny", action="store_true", help="smallest sizes (smoke tests)")
    p.add_argument("--only", nargs="+", metavar="BENCH", help="run only these bench modules")
    p.add_argument("--out", default=str(REPO / "bench" / "out"), help="results folder")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per bench")
    args = p.parse_args(argv)
    flags = ["--tiny"] if args.tiny else ["--quick"] if args.quick else []
    names = available(args.only)
    meta = {
        "commit": git_commit(),
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": environment(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    results = [run_one(name, flags, args.timeout) for name in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "benches": results}, indent=2))
    text = markdown(results, meta)
    (out / "results.md").write_text(text)
    print("\n" + text.split("\n\n## ", 1)[0], flush=True)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}", flush=True)
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
