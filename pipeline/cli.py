"""The `kdcache` command: precompute, inspect, verify (stage one) and train, evaluate (stage two).

Exit codes: 0 done or cache hit, 1 failure, 2 bad usage, 65 a store file damaged (its checksum
does not match the manifest), 75 store locked by another run, 130 / 143 stopped by SIGINT /
SIGTERM (rerun to resume).
"""

from __future__ import annotations

import json
import logging

import click

from kdcache.pipeline.cli_common import (
    build_config,
    common_options,
    emit,
    handle_errors,
    release_on_sigterm,
    setup_logging,
)
from kdcache.pipeline.cli_options import click_options
from kdcache.stages.common.config import STORAGE_HELP
from kdcache.stages.evaluate.config import InspectConfig
from kdcache.stages.evaluate.inspect import deep_scan
from kdcache.stages.precompute.config import PrecomputeConfig
from kdcache.storage import codecs
from kdcache.storage.errors import IntegrityError
from kdcache.storage.fsio import parse_storage_options
from kdcache.storage.options import Option
from kdcache.storage.reader import CacheReader

log = logging.getLogger("kdcache")
# Options a codec declares for itself (topk's top_k, ...): flags of `precompute`, gathered into
# PrecomputeConfig.codec_options. Empty until codecs are plug-ins; top_k is still a field.
CODEC_OPTIONS: tuple[Option, ...] = tuple(codecs.all_options())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdcache")
def main() -> None:
    """kdcache: run a teacher once into a sharded cache, then train many students from it."""


@main.command()
@click.option("--config", type=click.Path(), help="TOML file; any option below can live there.")
@click_options(PrecomputeConfig, extra=CODEC_OPTIONS)
@common_options
@handle_errors
def precompute(**options) -> None:
    """Stage one: run the teacher once and write soft labels (+ features) to a store."""
    from kdcache.pipeline.jobs import precompute as run

    setup_logging(bool(options.get("quiet")), bool(options.get("log_json")))
    log_json = bool(options.get("log_json"))
    cfg = build_config(PrecomputeConfig, options.get("config"), options, extra=CODEC_OPTIONS)
    release_on_sigterm()
    result = run(cfg)
    m = result["manifest"]
    if result["status"] == "hit" and m is not None:  # None: not rank 0
        emit(
            log_json,
            f"cache hit: {cfg.out} already holds this cache (fingerprint {m['fingerprint'][:12]}); "
            "nothing computed",
            status="hit",
            url=cfg.out,
            fingerprint=m["fingerprint"],
        )
    elif m is not None:
        s = m["stats"]
        emit(
            log_json,
            f"wrote {m['num_rows']} rows{_views_text(m)} in {len(m['shards'])} shards to "
            f"{cfg.out} in {result['seconds']:.1f}s ({s['bytes_per_sample']:.0f} bytes/"
            + ("view" if m.get("views") else "sample")
            + (f", {s['bytes_per_token']:.1f} bytes/token)" if "tokens" in s else ")"),
            status="done",
            url=cfg.out,
            fingerprint=m["fingerprint"],
            resumed_shards=result.get("resumed", 0),
            **s,
        )


def _views_text(m: dict) -> str:
    v = m.get("views")
    return f" ({m['num_rows'] // v['count']} samples x {v['count']} views)" if v else ""


def _summary(reader: CacheReader) -> dict:
    m, s = reader.manifest, reader.manifest.get("stats", {})
    f = reader.features_info
    return {
        "url": reader.url,
        "format": m["format"],
        "rows": reader.num_rows,
        "shards": len(reader.shards),
        "task": reader.task,
        "codec": reader.codec.name,
        "soft_labels": reader.codec.label(),
        **reader.codec.describe(s),
        **(
            {"views": v["count"], "augment": v["augment"], "augment_args": v["augment_args"]}
            if (v := reader.views)
            else {}
        ),
        "temperature": reader.temperature,
        "num_classes": reader.num_classes,
        "logit_dtype": reader.soft["dtype"],
        "feature_layer": f["layer"] if f else None,
        "feature_dim": f["dim"] if f else None,
        "feature_dtype": f["dtype"] if f else None,
        "total_bytes": s.get("total_bytes"),
        "bytes_per_sample": s.get("bytes_per_sample"),
        "disk_bytes_per_sample": s.get("disk_bytes_per_sample"),
        **(
            {
                "tokens": s["tokens"],
                "bytes_per_token": s.get("bytes_per_token"),
                "disk_bytes_per_token": s.get("disk_bytes_per_token"),
            }
            if "tokens" in s
            else {}
        ),
        "teacher_accuracy": s.get("teacher_accuracy"),
        **({k: s.get(k) for k in TARGET_STATS} if reader.targets_info else {}),
        "teacher_seconds": s.get("teacher_seconds"),
        "teacher": m["teacher"].get("spec"),
        "data": m["data"].get("spec"),
        "fingerprint": reader.fingerprint,
        "created": m.get("created"),
        "kdcache_version": m.get("kdcache_version"),
    }


# A regression store's true targets: how many rows have one, their scale, the teacher's error.
TARGET_STATS = ("target_rows", "target_mean", "target_std", "teacher_mse", "teacher_r2")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ", ".join(map(_fmt, value)) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@main.command()
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click_options(InspectConfig)
@handle_errors
def inspect(url: str, as_json: bool, **options) -> None:
    """Summarise a store: rows, shards, codec, T, k, bytes/sample, teacher accuracy, top-k cost."""
    cfg = build_config(InspectConfig, None, options)
    cfg.validate()
    reader = CacheReader(url, cfg.storage_options, cfg.verify_reads)
    summary = _summary(reader)
    if cfg.deep:
        summary.update(deep_scan(reader))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        click.echo(f"{key:<{width}}  {_fmt(value)}")


@main.command()
@click.argument("url")
@click.option("--storage-option", multiple=True, help=STORAGE_HELP)
@click.option("--quiet", is_flag=True, help="Print only problems.")
@handle_errors
def verify(url: str, storage_option: tuple[str, ...], quiet: bool) -> None:
    """Re-hash every file against the manifest; check schemas and row counts."""
    reader = CacheReader(url, parse_storage_options(storage_option))
    problems = reader.verify()
    if problems:
        raise IntegrityError(f"{url}: {len(problems)} problem(s):\n" + "\n".join(problems))
    if not quiet:
        files = sum(len(s["files"]) for s in reader.shards) + len(reader.manifest.get("files", {}))
        click.echo(
            f"ok: {url}: {reader.num_rows} rows, {len(reader.shards)} shards, {files} files verified"
        )


from kdcache.pipeline.cli_train import evaluate, train  # noqa: E402

main.add_command(train)
main.add_command(evaluate)

from kdcache.pipeline.cli_report import report  # noqa: E402

main.add_command(report)
