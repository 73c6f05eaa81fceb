"""`kdcache report`: one page comparing the teacher and every student trained from its cache."""

from __future__ import annotations

import click

from kdcache.pipeline.cli_common import common_options, emit, handle_errors, setup_logging


@click.command()
@click.option("--runs", default="runs", show_default=True, help="Folder of the job's runs.")
@click.option("--out", help="Markdown file (default RUNS/report.md); JSON and PNGs go beside it.")
@click.option("--teacher", help="The teacher's `kdcache train` folder (default RUNS/teacher).")
@click.option("--students", help="Folder with one folder per student (default RUNS/students).")
@click.option("--no-plots", is_flag=True, help="Skip the PNGs (no matplotlib needed).")
@click.option(
    "--no-agreement", is_flag=True, help="Do not load the models to measure teacher agreement."
)
@common_options
@handle_errors
def report(**options) -> None:
    """Write report.md, report.json and accuracy plots for a finished job."""
    from kdcache.pipeline.jobs import report as run
    from kdcache.stages.report import ReportConfig
    from kdcache.stages.report_text import headline, table

    setup_logging(bool(options.get("quiet")), bool(options.get("log_json")))
    cfg = ReportConfig(
        runs=options["runs"],
        out=options.get("out"),
        teacher=options.get("teacher"),
        students=options.get("students"),
        plots=not options["no_plots"],
        agreement=not options["no_agreement"],
    )
    result = run(cfg)
    if options.get("log_json"):
        keys = ("baseline", "baseline_accuracy", "best_student", "best_accuracy", "gain_points")
        emit(True, "report written", written=result["written"], **{k: result[k] for k in keys})
        return
    if not options.get("quiet"):
        click.echo(table(result).replace("**", ""))
        click.echo()
    click.echo(headline(result).replace("**", ""))  # markdown bold is noise on a terminal
    click.echo("wrote " + ", ".join(result["written"]))
