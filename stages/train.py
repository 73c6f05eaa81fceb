"""Stage two: train a student from a cache (or from hard labels alone), in one readable loop.

Loss per batch (formulas in stages/losses.py): ``alpha * soft + (1 - alpha) * hard + beta *
feature``; without ``--cache`` only the hard term; a regression cache trains on MSE to the stored
targets (plus ``beta * feature``). AdamW with linear warmup then cosine decay, stepped per batch.
The student never sees the teacher: only the cache's manifest and shards are read.

Resume: after every epoch rank 0 writes ``checkpoint-{epoch}.pt`` (model, projector, optimizer,
scheduler, RNG states). The loader position saved is the epoch boundary, so a run killed mid-epoch
redoes that epoch from its start. Rerunning a finished command (same settings) is a no-op.

Distributed (torchrun): DDP, each rank streams its own part of every epoch; ``Join`` absorbs the
at-most-a-few uneven last batches; metrics are all-reduced; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import asdict

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kdcache.pipeline.data import load_dataset
from kdcache.pipeline.models import load_model, logits_of
from kdcache.pipeline.runtime import (
    autocast,
    init_distributed,
    resolve_device,
    sum_dtype,
    to_device,
)
from kdcache.stages import losses
from kdcache.stages.config import EXECUTION, TrainConfig
from kdcache.stages.evaluate import (
    AgreementSet,
    dataset_batches,
    eval_sums,
    has_labels,
    reduce_sums,
)
from kdcache.stages.hooks import FeatureTap
from kdcache.stages.metrics import csv_text, epoch_line, run_totals, summarise
from kdcache.storage.errors import KdcacheError, UsageError
from kdcache.storage.fsio import open_location
from kdcache.storage.manifest import diff
from kdcache.storage.reader import CacheReader
from kdcache.storage.stream import CacheStream, LabelStream, check_data

log = logging.getLogger("kdcache.train")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.pt$")
KEEP_CHECKPOINTS = 2
TOPK = ("topk_indices", "topk_logits", "logsumexp")


class Distillee(nn.Module):
    """Student plus feature projector: one module, so DDP syncs both and one optimizer trains both."""

    def __init__(self, student: nn.Module, tap: FeatureTap | None, projector: nn.Module):
        super().__init__()
        self.student, self.projector, self.tap = student, projector, tap

    def forward(self, x):
        z = logits_of(self.student(x))
        if self.tap is None:
            return z, None
        f = self.tap.value
        return z, self.projector(f.reshape(len(f), -1))


def schedule(total: int, warmup: float):
    """LR factor per step: linear warmup over `warmup * total` steps, then cosine to zero."""
    warm = int(warmup * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _settings_diff(old: dict, new: dict) -> list[str]:
    keep = lambda d: {k: v for k, v in d.items() if k not in EXECUTION}  # noqa: E731
    return diff(keep(old), keep(new))


def _probe(student, data, tap, device) -> tuple[int, int | None]:
    """(output width, pooled feature width) from a two-row forward, in eval mode (BN untouched)."""
    from kdcache.pipeline.data import get_batch

    x, _ = get_batch(data, np.arange(min(2, len(data))))
    student.eval()
    with torch.no_grad():
        z = logits_of(student(to_device(x, device)))
    if z.dim() == 1:
        z = z[:, None]
    dim = None if tap is None or tap.value is None else int(tap.value[0].numel())
    return int(z.shape[1]), dim


class Trainer:
    """Everything one run needs, built and validated in `__init__` before any training."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        self.dist = init_distributed("cuda" if cuda else "cpu")
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        self.out = open_location(cfg.out, cfg.storage_options)
        self.reader = CacheReader(cfg.cache, cfg.storage_options) if cfg.cache else None
        r = self.reader
        self.task = r.task if r else "classification"
        if r and cfg.temperature is None:
            cfg.temperature = r.temperature
        if r and cfg.beta > 0 and not r.has_features:
            raise UsageError(
                f"--beta {cfg.beta} needs teacher features but the cache {r.url} stores none: "
                "recompute it with `kdcache precompute --features LAYER`, or use --beta 0"
            )
        self.settings = asdict(cfg)

    def finished(self) -> dict | None:
        """The summary of an identical finished run, if there is one (then this run is a no-op)."""
        if not self.out.exists("summary.json"):
            return None
        summary = json.loads(self.out.read_bytes("summary.json"))
        changes = _settings_diff(summary.get("settings", {}), self.settings)
        if changes:
            raise UsageError(
                f"{self.cfg.out} holds a finished run with other settings ({'; '.join(changes)}): "
                "use another --out, or delete that folder to retrain"
            )
        return summary

    def check(self) -> tuple[nn.Module, FeatureTap | None, int | None]:
        """Every check `setup` makes (data, eval labels, student, its width and feature layer),
        so that a list of students fails on a bad one before the first of them trains."""
        cfg, r = self.cfg, self.reader
        self.data = load_dataset(cfg.data, cfg.data_args)
        self.eval_data = load_dataset(cfg.eval_data, cfg.eval_data_args) if cfg.eval_data else None
        if self.eval_data is not None and self.task == "classification":
            has_labels(self.eval_data)
        if r and not cfg.ignore_fingerprint:  # (CacheStream warns about an ignored mismatch)
            check_data(r, self.data)
        torch.manual_seed(cfg.seed)
        student, _ = load_model(cfg.student, cfg.student_args, None, what="--student")
        tap = None
        if cfg.beta > 0:
            tap = FeatureTap(student, cfg.student_features, cfg.pool, "--student-features")
            tap.__enter__()
        width, sdim = _probe(student, self.data, tap, torch.device("cpu"))
        if r and width != r.num_classes:
            raise UsageError(
                f"--student {cfg.student} outputs {width} values per sample but the cache has "
                f"{r.num_classes} classes: pass --student-arg num_classes={r.num_classes} or so"
            )
        return student, tap, sdim

    def setup(self) -> None:
        cfg, r = self.cfg, self.reader
        if cfg.threads:
            # Small models on a busy CPU can run several times faster on one thread.
            torch.set_num_threads(cfg.threads)
        student, tap, sdim = self.check()
        rank, world = self.dist.rank, self.dist.world_size
        common = dict(seed=cfg.seed, rank=rank, world_size=world, num_workers=cfg.num_workers)
        if r:
            common.update(buffer_size=cfg.buffer_size, prefetch=cfg.prefetch, features=cfg.beta > 0)
            self.stream = CacheStream(
                r, self.data, cfg.batch_size, ignore_fingerprint=cfg.ignore_fingerprint, **common
            )
        else:
            self.stream = LabelStream(self.data, cfg.batch_size, **common)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.student = student.to(self.device)
        self.num_params = sum(p.numel() for p in student.parameters() if p.requires_grad)
        projector: nn.Module = nn.Identity()
        if tap is not None and sdim != r.features_info["dim"]:
            projector = nn.Linear(sdim, r.features_info["dim"])
        self.model = Distillee(student, tap, projector).to(self.device).train()
        self.ddp = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.steps = max(self.stream.num_batches(k) for k in range(world))  # same on every rank
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, schedule(cfg.epochs * self.steps, cfg.warmup)
        )
        self.agree = None
        if r and self.task == "classification":
            self.agree = AgreementSet(r, self.data, cfg.agree_rows)

    # ----------------------------------------------------------------- one batch, one epoch

    def loss_terms(self, z, proj, batch) -> dict[str, torch.Tensor]:
        cfg, r, dev = self.cfg, self.reader, self.device
        zero = z.new_zeros((), dtype=torch.float32)
        hard = soft = feat = zero
        if self.task == "regression":
            soft = losses.regression_loss(z.reshape(len(z), -1), to_device(batch["logits"], dev))
        else:
            hard = losses.hard_loss(z, to_device(batch["label"], dev))
            if r and r.codec == "dense":
                soft = losses.soft_loss_dense(
                    z, to_device(batch["logits"], dev), r.temperature, cfg.temperature
                )
            elif r:
                idx, vals, lse = (to_device(batch[k], dev) for k in TOPK)
                soft = losses.soft_loss_topk(z, idx, vals, lse, r.temperature, cfg.temperature)
        if proj is not None:
            feat = losses.feature_loss(proj, to_device(batch["features"], dev))
        if not r:
            total = hard
        elif self.task == "regression":
            total = soft + cfg.beta * feat
        else:
            total = cfg.alpha * soft + (1 - cfg.alpha) * hard + cfg.beta * feat
        return {"loss": total, "hard_loss": hard, "soft_loss": soft, "feature_loss": feat}

    def train_epoch(self, epoch: int, history: list) -> dict:
        self.stream.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        names = ("loss", "hard_loss", "soft_loss", "feature_loss")
        sums = torch.zeros(len(names) + 1, dtype=sum_dtype(self.device), device=self.device)
        self.model.train()
        done = 0
        join = contextlib.nullcontext()
        if self.dist.enabled:
            from torch.distributed.algorithms.join import Join

            join = Join([self.ddp])
        bar = tqdm(
            loader,
            total=len(self.stream),
            desc=f"epoch {epoch}/{self.cfg.epochs}",
            unit="batch",
            leave=False,
            disable=True if (self.cfg.quiet or not self.dist.is_main) else None,
        )
        with join:
            for batch in bar:
                with autocast(self.device, self.cfg.precision):
                    z, proj = self.ddp(to_device(batch["input"], self.device))
                terms = self.loss_terms(z.float(), None if proj is None else proj.float(), batch)
                self.opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                self.opt.step()
                self.sched.step()
                done += 1
                n = len(batch["sample_id"])
                sums += torch.stack(
                    [terms[k].detach().to(sums.dtype) * n for k in names] + [sums.new_tensor(n)]
                )
                if len(history) < 64:
                    history.append({k: float(terms[k].detach()) for k in names})
        # A rank with fewer batches catches the shared schedule up, so LRs agree across ranks.
        for _ in range(self.steps - done):
            self.sched.step()
        sums = reduce_sums(sums, self.dist.enabled).cpu()
        n = max(1.0, float(sums[-1]))
        return {k: float(sums[i]) / n for i, k in enumerate(names)} | {"rows": int(sums[-1])}

    def evaluate(self) -> dict:
        cfg, world, rank = self.cfg, self.dist.world_size, self.dist.rank
        out = {"eval_loss": None, "eval_accuracy": None, "eval_ece": None, "agreement": None}
        if self.eval_data is not None and self.task == "classification":
            batches = dataset_batches(self.eval_data, cfg.eval_batch_size, rank, world)
            sums = eval_sums(self.student, batches, self.device, cfg.precision)
            m = summarise(reduce_sums(sums, self.dist.enabled))
            out.update(eval_loss=m["loss"], eval_accuracy=m["accuracy"], eval_ece=m["ece"])
        if self.agree is not None:
            batches = self.agree.batches(cfg.eval_batch_size, rank, world)
            sums = eval_sums(self.student, batches, self.device, cfg.precision)
            out["agreement"] = summarise(reduce_sums(sums, self.dist.enabled))["accuracy"]
        self.model.train()
        return out

    # ----------------------------------------------------------------- files

    def _save(self, name: str, obj) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.out.write_bytes(buf.getvalue(), name)

    def save_checkpoint(self, epoch: int, rows: list, extra: dict) -> None:
        np_state = np.random.get_state()
        self._save(
            f"checkpoint-{epoch}.pt",
            {
                "model": self.student.state_dict(),
                "projector": self.model.projector.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "numpy": (
                        np_state[0],
                        torch.from_numpy(np_state[1].astype(np.int64)),
                        *np_state[2:],
                    ),
                    "python": random.getstate(),
                },
                "epoch": epoch,
                "rows": rows,
                "settings": self.settings,
                "extra": extra,
            },
        )
        self.out.write_bytes(csv_text(rows).encode(), "metrics.csv")
        for old in self.out.listdir():
            m = CHECKPOINT.match(old)
            if m and int(m.group(1)) <= epoch - KEEP_CHECKPOINTS:
                self.out.remove(old)

    def resume(self) -> tuple[int, list, dict]:
        """(last finished epoch, its metrics rows, saved extras) from the newest checkpoint."""
        found = sorted(int(m.group(1)) for n in self.out.listdir() if (m := CHECKPOINT.match(n)))
        if not found:
            return 0, [], {}
        epoch = found[-1]
        state = torch.load(
            io.BytesIO(self.out.read_bytes(f"checkpoint-{epoch}.pt")),
            map_location="cpu",
            weights_only=True,
        )
        changes = _settings_diff(state["settings"], self.settings)
        if changes:
            raise UsageError(
                f"{self.cfg.out} holds checkpoints of a run with other settings "
                f"({'; '.join(changes)}): use another --out, or delete it to start over"
            )
        self.student.load_state_dict(state["model"])
        self.model.projector.load_state_dict(state["projector"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        random.setstate(rng["python"])
        rows = list(state["rows"])
        log.info(
            "resuming %s from checkpoint-%d.pt (epoch %d/%d)",
            self.cfg.out,
            epoch,
            epoch,
            self.cfg.epochs,
        )
        return epoch, rows, state.get("extra", {})

    def summary(self, rows: list, wall: float) -> dict:
        cfg, r = self.cfg, self.reader
        return {
            "name": cfg.name,
            "student": cfg.student,
            "student_args": cfg.student_args,
            "num_params": self.num_params,
            "cache": cfg.cache,
            "cache_fingerprint": r.fingerprint if r else None,
            "settings": self.settings,
            "epochs": rows[-1]["epoch"],
            "wall_seconds": wall,
            **run_totals(rows),
        }


def _tensorboard(cfg: TrainConfig, loc):
    if not loc.is_local:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(loc.root, "tensorboard"))


def run(cfg: TrainConfig, stop_after_epoch: int | None = None) -> dict:
    """Train (or resume, or recognise as done) one student; returns {"status", "summary", ...}.

    `stop_after_epoch` ends the run cleanly after that epoch, as a kill would (tests, schedulers).
    """
    started = time.perf_counter()
    t = Trainer(cfg)
    done = _on_main(t.dist, t.finished)
    if done is not None:
        return {"status": "done-before", "summary": done, "history": []}
    t.setup()
    first, rows, extra = t.resume()
    tb = _tensorboard(cfg, t.out) if t.dist.is_main else None
    history: list = []
    last = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    for epoch in range(first + 1, last + 1):
        tick = time.perf_counter()
        train = t.train_epoch(epoch, history)
        seconds = time.perf_counter() - tick
        row = {
            "epoch": epoch,
            "step": epoch * t.steps,
            "lr": t.sched.get_last_lr()[0],
            **{k: v for k, v in train.items() if k != "rows"},
            **t.evaluate(),
            "epoch_seconds": seconds,
            "samples_per_sec": train["rows"] / seconds if seconds else None,
        }
        rows.append(row)
        if t.dist.is_main:
            log.info(epoch_line(row, cfg.epochs))
            extra["wall_seconds"] = extra.get("wall_seconds", 0.0) + time.perf_counter() - started
            started = time.perf_counter()
            t.save_checkpoint(epoch, rows, extra)
            if tb is not None:
                for k, v in row.items():
                    if k != "epoch" and v is not None:
                        tb.add_scalar(k, v, epoch)
        t.dist.barrier()
    if tb is not None:
        tb.close()
    if last < cfg.epochs:
        return {"status": "stopped", "summary": None, "history": history, "rows": rows}
    summary = None
    if t.dist.is_main:
        wall = extra.get("wall_seconds", 0.0) + time.perf_counter() - started
        t._save("model.pt", t.student.state_dict())
        summary = t.summary(rows, wall)
        t.out.write_bytes((json.dumps(summary, indent=2) + "\n").encode(), "summary.json")
    t.dist.barrier()
    return {"status": "done", "summary": summary, "history": history, "rows": rows}


def _on_main(d, fn):
    """`fn()` on rank 0, its result (or its error) on every rank."""
    result: tuple = ("ok", None)
    if d.is_main:
        try:
            result = ("ok", fn())
        except KdcacheError as exc:
            result = ("error", exc)
    kind, value = d.broadcast(result)
    if kind == "error":
        raise value
    return value
