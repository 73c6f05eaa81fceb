"""`kdcache report`: one page comparing the teacher and every student trained from its cache."""

from __future__ import annotations

import click

from kdcache.pipeline.cli_common import (
    build_config,
    common_options,
    emit,
    handle_errors,
    setup_logging,
)
from kdcache.pipeline.cli_options import click_options
from kdcache.stages.report.config import ReportConfig


@click.command()
@click_options(ReportConfig)
@common_options
@handle_errors
def report(**options) -> None:
    """Write report.md, report.json and accuracy plots for a finished job."""
    from kdcache.pipeline.jobs import report as run
    from kdcache.stages.report import sections
    from kdcache.stages.report.run import ReportConfig
    from kdcache.stages.report.text import headline, table

    setup_logging(bool(options.get("quiet")), bool(options.get("log_json")))
    cfg = build_config(ReportConfig, None, options)
    result = run(cfg)
    lm = result.get("lm")
    if options.get("log_json"):
        keys = ("baseline", "baseline_accuracy", "best_student", "best_accuracy", "gain_points")
        extra = {"lm": lm["headline"]} if lm else {}
        emit(
            True,
            "report written",
            written=result["written"],
            **{k: result[k] for k in keys},
            **extra,
        )
        return
    parts = [(table(result), headline(result))] if result["students"] else []
    parts += [s.terminal(result[s.key]) for s in sections.every() if s.key in result]
    for tab, line in parts:
        if not options.get("quiet"):
            click.echo(tab.replace("**", ""))
            click.echo()
        click.echo(line.replace("**", ""))  # markdown bold is noise on a terminal
    click.echo("wrote " + ", ".join(result["written"]))
