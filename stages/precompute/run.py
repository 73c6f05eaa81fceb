"""Stage one: run the teacher once over a data set into a sharded, verifiable store.

Ranks (torchrun) take shard i when i % world == rank; rank 0 holds the lock, prepares the store and
publishes the manifest after a barrier. Inside a rank the teacher runs in the main thread and a
writer thread encodes and publishes shards, so compute never waits on disk or network.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from kdcache.stages import tasks
from kdcache.stages.common import views
from kdcache.stages.common.data import data_fingerprint, forward_tokens
from kdcache.stages.common.device import autocast, to_device
from kdcache.stages.common.hooks import FeatureTap, logits_of
from kdcache.stages.precompute.conditions import conditions, warn_if_resumed_elsewhere
from kdcache.stages.precompute.config import PrecomputeConfig
from kdcache.stages.precompute.device_encode import (
    DeviceStats,
    ShardEnd,
    TeacherBatch,
    copied_event,
    encode_sequences,
    to_host,
)
from kdcache.stages.precompute.encode import (
    add_stats,
    check_logits,
    check_token_logits,
    encode_batch,
    summarise,
)
from kdcache.stages.precompute.writer import WriterThread
from kdcache.stages.tasks.causal_lm import target_mask
from kdcache.storage import codecs, faults
from kdcache.storage.codecs.base import Workspace
from kdcache.storage.errors import FormatError, KdcacheError, UsageError
from kdcache.storage.fsio import io_failure, open_location
from kdcache.storage.lock import StoreLock
from kdcache.storage.manifest import (
    FORMAT,
    kdcache_version,
    load_manifest,
    store_fingerprint,
)
from kdcache.storage.writer import StoreWriter, existing_state, wipe

log = logging.getLogger("kdcache.precompute")
CHUNK_BYTES = 64 << 20


def _identity(cfg: PrecomputeConfig, teacher_id: dict, ds, data_fp: str) -> dict:
    kind = codecs.codec_class(cfg.codec)
    soft = {"codec": cfg.codec, "dtype": cfg.dtype, **kind.configure(cfg.codec_options, cfg.task)}
    header = {
        "format": FORMAT,
        "teacher": teacher_id,
        "data": {
            "spec": cfg.data,
            "kwargs": cfg.data_args,
            "num_samples": len(ds),
            "fingerprint": data_fp,
        },
        "temperature": float(cfg.temperature),
        "soft_labels": soft,
        "features": (
            {
                "layer": cfg.features,
                "pool": cfg.pool,
                "dtype": cfg.feature_dtype,
                "compression": cfg.feature_compression,
            }
            if cfg.features
            else None
        ),
        "shard_rows": views.shard_rows(len(ds), cfg.shard_rows, cfg.views),
        "num_rows": len(ds) * cfg.views,
        "task": cfg.task,
        "precision": cfg.precision,
    }
    if cfg.augment is not None:  # absent otherwise: such stores stay as they were before views
        header["views"] = views.header(cfg)
    if tasks.get(cfg.task).stores_targets:
        header["targets"] = {"dtype": "float32"}  # its width (the teacher's) follows the probe
    header["fingerprint"] = store_fingerprint(header)
    return header


def _forward(model, x, device, cfg, tap):
    if tap is not None:
        tap.value = None  # never hand on the last batch's features if the layer did not run
        tap.mask = x["attention_mask"].to(device) if isinstance(x, dict) else None
    try:
        with torch.inference_mode(), autocast(device, cfg.precision):
            if isinstance(x, dict):  # token inputs: input_ids and attention_mask
                inputs = {k: to_device(v, device) for k, v in x.items()}
                z = logits_of(forward_tokens(model, inputs))
            else:
                z = logits_of(model(to_device(x, device)))
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # One line, not a traceback: most often the teacher does not take what --data gives.
        raise KdcacheError(
            f"the teacher's forward failed on a --task {cfg.task} batch ({first}): check that "
            "--teacher takes the inputs --data gives"
        ) from None
    if tap is None:
        return z, None
    if tap.value is None:
        raise UsageError(
            f"--features {cfg.features!r} did not run during the teacher's forward: "
            "choose a submodule the forward pass calls"
        )
    return z, tap.value


# Tokens the byte budget is measured on: compressed sizes of a few hundred tokens are mostly a
# column chunk's fixed cost (topk k = 13 at V = 4,096: 90 B/token on 128 tokens, 46 on 4,096,
# 43 on 16,384, against 46 in a 65k-token shard). Two rows of an LLM's 2k-token blocks hold it.
BUDGET_PROBE_TOKENS = 4096


def _budget_probe(model, view, ds, x, z, device, cfg) -> torch.Tensor:
    """The target tokens' logits (tokens, V) float32 that `--budget-bytes-per-token` is fitted
    on: the probe batch's, or the first rows holding BUDGET_PROBE_TOKENS when it has fewer."""
    mask = target_mask(x)
    have = int(mask.sum())
    rows = min(len(ds), -(-BUDGET_PROBE_TOKENS * len(mask) // max(1, have)))
    if have < BUDGET_PROBE_TOKENS and rows > len(mask):
        _, x, *_ = view[np.arange(rows)]
        z, _ = _forward(model, x, device, cfg, None)
        mask = target_mask(x)
    return z[mask.to(z.device).bool()].float()


def _complete_header(header, model, ds, device, cfg, augment=None) -> dict:
    """Probe one small batch for the derived sizes: num_classes and the feature dim."""
    view = views.batches(ds, cfg, header.get("views"), augment)
    ids, x, *_ = view[np.arange(min(2, len(ds)))]
    tap = FeatureTap(model, cfg.features, cfg.pool) if cfg.features else None
    with tap or contextlib.nullcontext():
        z, feats = _forward(model, x, device, cfg, tap)
    if isinstance(x, dict):
        z = check_token_logits(z, ids.numpy(), x["attention_mask"])
    else:
        z = check_logits(tasks.get(cfg.task).teacher_outputs(z), ids.numpy(), len(ids))
    c = int(z.shape[-1])
    header["soft_labels"]["num_classes"] = c
    if cfg.budget_bytes_per_token is not None:
        kind = codecs.codec_class(cfg.codec)
        s = _budget_probe(model, view, ds, x, z, device, cfg).div_(header["temperature"])
        chosen = kind.fit_budget(cfg.budget_bytes_per_token, s, {"dtype": cfg.dtype})
        header["soft_labels"].update(chosen)
        log.info(
            "--budget-bytes-per-token %g: %s chose %s",
            cfg.budget_bytes_per_token,
            cfg.codec,
            ", ".join(f"{k} = {v}" for k, v in chosen.items()),
        )
    codecs.open_codec(header["soft_labels"], cfg.task).check_classes(c)
    header["teacher"]["num_classes"] = c
    if header.get("targets") is not None:
        header["targets"]["width"] = c
    if feats is not None:
        dim = int(feats.shape[1]) if feats.dim() == 2 else int(np.prod(feats.shape[1:]))
        itemsize = np.dtype(cfg.feature_dtype).itemsize
        cols = max(1, min(dim, CHUNK_BYTES // (header["shard_rows"] * itemsize)))
        header["features"].update(dim=dim, chunk_cols=cols, path="features.zarr")
    return header


def _plan(n: int, shard_rows: int, batch_size: int, shards: list[int]) -> list[tuple]:
    """(shard, ids) per batch; batches never straddle shards so any split gives equal bytes."""
    out = []
    for i in shards:
        lo, hi = i * shard_rows, min(n, (i + 1) * shard_rows)
        for a in range(lo, hi, batch_size):
            out.append((i, np.arange(a, min(hi, a + batch_size), dtype=np.int64)))
    return out


def _prepare_store(loc, header, cfg, model, ds, device, augment=None) -> tuple:
    """Rank 0: decide hit / fresh / resume, and make the store ready for the writers."""
    try:
        state = existing_state(loc, header)
    except (UsageError, FormatError):
        # Other settings, an unknown format version or a damaged manifest: all replaceable, but
        # only when the folder is a kdcache store (never someone else's files).
        if not cfg.force or not (loc.exists("_run.json") or loc.exists("manifest.json")):
            raise
        state = "replace"
    if state == "complete" and not cfg.force:
        return ("hit", load_manifest(loc))
    # Probe the teacher before wiping anything, so that a bad option cannot cost the old store.
    header = _complete_header(header, model, ds, device, cfg, augment)
    faults.point("precompute.probed")
    if state in ("replace", "complete"):
        log.warning("--force: replacing the store at %s", loc.url)
        wipe(loc)
    store = StoreWriter(loc, header)
    store.prepare()
    markers = store.markers()
    now = conditions(device, cfg.precision, cfg.batch_size)
    warn_if_resumed_elsewhere(loc.url, {i: m.get("conditions") for i, m in markers.items()}, now)
    return ("run", header, sorted(markers))


def _acquire(lock: StoreLock) -> None:
    # The lock is the first write to --out, so it is where an unwritable location shows up.
    try:
        lock.acquire()
    except OSError as exc:
        raise UsageError(
            f"cannot write to --out {lock.loc.url}: {exc.strerror or exc}; choose a writable location"
        ) from None


def _publish(store: StoreWriter, seconds: dict) -> dict:
    totals: dict = {}
    entries = store.committed()
    for entry in entries.values():
        add_stats(totals, entry["stats"])
    stats = summarise(totals, store.codec)
    size = sum(f["bytes"] for e in entries.values() for f in e["files"].values())
    rows = max(1, store.header["num_rows"])
    stats.update(
        total_bytes=size,
        # The values themselves per row (keys, label, soft labels, features); disk_ adds Parquet's
        # and Zarr's per-file overhead, which dominates only in tiny stores.
        bytes_per_sample=totals.get("payload_bytes", 0) / rows,
        disk_bytes_per_sample=size / rows,
        **seconds,
    )
    if totals.get("tokens"):
        # Tokens stored (targets) against tokens seen (every real input token): they differ
        # when a chat data set learns only the assistant's tokens.
        stats.update(
            tokens=totals["tokens"],
            tokens_seen=totals.get("tokens_seen", totals["tokens"]),
            bytes_per_token=totals["payload_bytes"] / totals["tokens"],
            # What the files take (compression included): a compressed layout's real cost.
            disk_bytes_per_token=size / totals["tokens"],
        )
    return store.publish(stats, extra={"kdcache_version": kdcache_version()})


def run(
    cfg: PrecomputeConfig, model, teacher_id: dict, ds, dist, device, started=None, augment=None
) -> dict:
    """Stage one with a built teacher (on `device`) and data set; returns {"status": "hit" |
    "done", "manifest": ..., ...}. `dist` is this process's place among the ranks (rank,
    world_size, is_main, barrier, decide); `started` is when the job began (perf_counter);
    `augment` the callable `--augment` names (stages/common/views.py). The stage works from
    `cfg.resolved()`: every check at once, its defaults (codec, T, codec options) filled."""
    cfg = cfg.resolved()
    started = time.perf_counter() if started is None else started
    loc = open_location(cfg.out, cfg.storage_options)
    header = _identity(
        cfg, teacher_id, ds, data_fingerprint(ds, tasks.get(cfg.task).per_token, cfg.data)
    )
    lock = StoreLock(loc) if dist.is_main else None

    def prepare() -> tuple:
        faults.point("precompute.start")
        _acquire(lock)
        return _prepare_store(loc, header, cfg, model, ds, device, augment)

    try:
        decision = dist.decide(prepare)
        if decision[0] == "hit":
            return {
                "status": "hit",
                "manifest": decision[1] if dist.is_main else None,  # one report per run
                "seconds": time.perf_counter() - started,
            }
        _, header, committed = decision
        store = StoreWriter(loc, header, conditions(device, cfg.precision, cfg.batch_size))
        num_shards = -(-header["num_rows"] // header["shard_rows"])
        mine = [
            i for i in range(num_shards) if i % dist.world_size == dist.rank and i not in committed
        ]
        teacher_seconds = _compute(store, mine, model, ds, device, cfg, dist.is_main, augment)
        faults.point("precompute.computed")
        dist.barrier()
        if not dist.is_main:
            return {"status": "done", "manifest": None, "seconds": time.perf_counter() - started}
        wall = time.perf_counter() - started
        lock.check()  # taken over as stale while we worked: the new owner publishes, not us
        manifest = _publish(store, {"teacher_seconds": teacher_seconds, "wall_seconds": wall})
        faults.point("precompute.published")
        return {"status": "done", "manifest": manifest, "seconds": wall, "resumed": len(committed)}
    except Exception as exc:
        # Disk full, read-only, endpoint gone: one line naming the store, not a library's error.
        failure = io_failure(exc, loc.url)
        if failure is None:
            raise
        raise failure from None
    finally:
        if lock is not None and lock._thread is not None:
            lock.release()
            faults.point("precompute.released")


def _encode_rows(z, y_np, ids_np, codec, temperature, task) -> TeacherBatch:
    """A classifier's or regressor's batch (B, C): small, so encoded whole; its checks and
    statistics read back per batch (host syncs, B x C values)."""
    z = check_logits(task.teacher_outputs(z), ids_np, len(ids_np))
    y_np, targets = task.stored_labels(y_np, ids_np, z.shape[1])
    columns, stats = encode_batch(z, y_np, ids_np, codec, temperature, None, targets)
    return TeacherBatch(columns=columns, stats=stats)


def _compute(store, shards, model, ds, device, cfg, show: bool, augment=None) -> float:
    """Teacher forward over this rank's shards, handing batches to the writer thread."""
    n = store.header["num_rows"]
    plan = _plan(n, store.header["shard_rows"], cfg.batch_size, shards)
    if not plan:
        return 0.0
    loader = torch.utils.data.DataLoader(
        views.batches(ds, cfg, store.header.get("views"), augment),
        sampler=[ids for _, ids in plan],
        batch_size=None,
        num_workers=cfg.num_workers,
    )
    writer = WriterThread(store, cfg.queue_depth)
    writer.start()
    tap = FeatureTap(model, cfg.features, cfg.pool) if cfg.features else None
    rows = sum(len(ids) for _, ids in plan)
    bar = tqdm(
        total=rows,
        unit="sample",
        desc="precompute",
        disable=True if (cfg.quiet or not show) else None,
    )
    busy = 0.0
    current = None
    stats, work = DeviceStats(), Workspace()
    codec = store.codec
    temperature = store.header["temperature"]
    feature_dtype = getattr(torch, store.header["features"]["dtype"]) if cfg.features else None
    try:
        with tap or contextlib.nullcontext(), bar:
            for (shard, _), (ids, x, y, *keys) in zip(plan, loader, strict=True):
                if shard != current:
                    if current is not None:
                        writer.put(ShardEnd(stats.read()))
                    writer.put(shard)
                    current = shard
                    faults.point("precompute.new_shard")
                t = time.perf_counter()
                z, feats = _forward(model, x, device, cfg, tap)
                ids_np, y_np = ids.numpy(), y.numpy()
                if isinstance(x, dict):
                    # Finiteness folds into the codec's logsumexp (read per shard), if it has one.
                    z = check_token_logits(z, ids_np, x["attention_mask"], not codec.on_device)
                    item = encode_sequences(
                        z, x, ids_np, codec, temperature, stats, cfg.encode_chunk_bytes, work
                    )
                else:
                    item = _encode_rows(z, y_np, ids_np, codec, temperature, tasks.get(cfg.task))
                del z  # the logits go now: nothing below or in the queue holds them
                if feats is not None:
                    # Cast on the device, then copy: the stored width crosses, not float32.
                    feats = feats.reshape(len(ids_np), -1).to(feature_dtype)
                    host = to_host(feats)
                    item.ready.append(copied_event(feats.device))  # after the copy is queued
                    feats = host
                item.features = feats
                if keys:
                    item.columns.update({k: v.numpy() for k, v in keys[0].items()})
                busy += time.perf_counter() - t
                faults.point("precompute.batch")
                writer.put(item)
                bar.update(len(ids_np))
            if current is not None:
                writer.put(ShardEnd(stats.read()))
            writer.put(None)
            writer.join()
    except BaseException:
        writer.abort()
        raise
    writer.raise_if_failed()
    return busy
