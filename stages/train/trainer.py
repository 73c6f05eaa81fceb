"""Stage two: train a student from a cache (or from hard labels alone), in one readable loop.

The loss of each batch is `StudentLoss` (stages/train/loss.py: the task's hard term, the codec's
soft term, features, relations); what a task is (inputs, metrics, the teacher comparison) its
`Task` object says (stages/tasks/). The batches come from `streams.build` (stages/train/streams.py).
AdamW with linear warmup then cosine decay, stepped per batch. With a cache the student never
sees the teacher: only the cache's manifest and shards are read.

Resume: after every epoch rank 0 writes ``checkpoint-{epoch}.pt`` (model, projector, optimizer,
scheduler, RNG states). The loader position saved is the epoch boundary, so a run killed mid-epoch
redoes that epoch from its start. Rerunning a finished command (same settings) is a no-op.

Distributed (torchrun): DDP, each rank streams its own part of every epoch; ``Join`` absorbs the
at-most-a-few uneven last batches; metrics are all-reduced; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kdcache.stages import tasks
from kdcache.stages.common.device import autocast, sum_dtype, to_device
from kdcache.stages.common.hooks import FeatureTap
from kdcache.stages.tasks import lm_head, lm_loss
from kdcache.stages.tasks.base import Measure
from kdcache.stages.tasks.causal_lm import target_mask
from kdcache.stages.tasks.scoring import reduce_sums
from kdcache.stages.train import checkpoint, streams
from kdcache.stages.train.config import TrainConfig
from kdcache.stages.train.loss import StudentLoss
from kdcache.stages.train.online import OnlineTeacher
from kdcache.stages.train.run_log import epoch_line, run_totals
from kdcache.stages.train.setup import (
    Distillee,
    finished,
    probe,
    resolve,
    run_settings,
    schedule,
    settings_diff,
)
from kdcache.stages.train.streams import check_data
from kdcache.storage import faults
from kdcache.storage.errors import UsageError

log = logging.getLogger("kdcache.train")

# What callers (pipeline/jobs.py, tests) import from here; the build-up lives in setup.py.
__all__ = ["Distillee", "TrainConfig", "Trainer", "finished", "resolve", "run_settings", "schedule"]


class Trainer:
    """One student's run: built (and checked) once, then setup -> train -> cleanup.

    It is given what the pipeline built: the process group `dist`, the `device`, the cache's
    reader (or None), the run folder, the data sets, the freshly seeded student and, for online
    KD, the teacher as (model, identity). Building it
    makes every check those allow (eval labels, data fingerprint, output width, feature layer),
    so a list of students fails on a bad one before the first of them trains. Use it as a context
    manager: leaving it removes the feature hook and closes TensorBoard.
    """

    def __init__(
        self,
        cfg,
        dist,
        device,
        reader,
        folder,
        data,
        eval_data,
        student: nn.Module,
        teacher=None,
        augment=None,
    ):
        # The run works from `cfg` resolved (stages/train/setup.py: checked, the cache's and the
        # task's defaults filled); resolving a resolved config changes nothing.
        cfg = resolve(cfg, reader)
        self.cfg, self.dist, self.device, self.reader, self.folder = (
            cfg,
            dist,
            device,
            reader,
            folder,
        )
        self.data, self.eval_data, self.augment = data, eval_data, augment
        self.settings = asdict(cfg)
        self.task = tasks.get(cfg.task)
        self.cleanup_stack = contextlib.ExitStack()
        try:
            self._build(student, teacher)
        except BaseException:
            self.cleanup()
            raise

    def _build(self, student: nn.Module, teacher: tuple | None) -> None:
        cfg, r, task = self.cfg, self.reader, self.task
        if r and not cfg.ignore_fingerprint:  # (JoinedStream warns about an ignored mismatch)
            check_data(r, self.data)
        tap = None
        if cfg.beta > 0 or cfg.relation:
            tap = FeatureTap(student, cfg.student_features, cfg.pool, "--student-features")
            self.cleanup_stack.enter_context(tap)
        width, sdim = probe(student, self.data, tap, torch.device("cpu"), task)
        self.width = width
        if self.eval_data is not None:
            task.check_eval_data(self.eval_data, width)
        if r and width != r.num_classes:
            raise UsageError(
                f"--student {cfg.student} outputs {width} values per sample but the cache has "
                f"{r.num_classes} classes: pass --student-arg num_classes={r.num_classes} or so"
            )
        self.online = None
        if teacher is not None:
            self.online = OnlineTeacher(*teacher, task)
            tw, _ = probe(teacher[0], self.data, None, torch.device("cpu"), task, "--teacher")
            if tw != width:
                raise UsageError(
                    f"--teacher {cfg.teacher} outputs {tw} values per sample but --student "
                    f"{cfg.student} {width}: give the student the teacher's classes (vocabulary)"
                )
        self.head, chunk, plain = None, 0, False
        if task.per_token:  # the chunked loss (stages/tasks/lm_loss.py), fused where it can be
            x = task.inputs(self.data, np.arange(min(2, len(self.data))))
            # A plug-in codec without per-token targets keeps the plain loss (its soft_loss on
            # the valid tokens' full logits): nothing to fuse then.
            plain = r is not None and not r.codec.has_token_targets
            wanted = False if plain and not cfg.fused_head else cfg.fused_head
            self.head = lm_head.resolve(student, x, width, wanted, cfg.student)
            if plain and self.head is not None:
                raise UsageError(
                    f"--fused-head: the {r.codec.name} codec gives no per-token targets "
                    "(Codec.token_targets) for the fused loss: drop --fused-head"
                )
            mb = cfg.loss_chunk_mb or lm_loss.default_chunk_mb(self.device)
            chunk = lm_loss.chunk_tokens(mb, width)
            lm_loss.chunk_tokens(cfg.eval_logits_mb, width, "--eval-logits-mb")
        self.student = student
        self.num_params = sum(p.numel() for p in student.parameters() if p.requires_grad)
        projector: nn.Module = nn.Identity()
        if cfg.beta > 0 and sdim != r.features_info["dim"]:
            projector = nn.Linear(sdim, r.features_info["dim"])
        self.model = Distillee(student, tap, projector, task, project=cfg.beta > 0, head=self.head)
        self.loss = StudentLoss(cfg, task, r, self.online, tap, self.head, chunk, plain)
        # Every student of a [[students]] list is built before the first trains: each one trains
        # from the RNG state its own seeded build left, as it would alone.
        self.rng = checkpoint.rng_state()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        self.cleanup_stack.close()

    def setup(self) -> None:
        cfg, r = self.cfg, self.reader
        self.started = time.perf_counter()
        if cfg.threads:
            # Small models on a busy CPU can run several times faster on one thread.
            torch.set_num_threads(cfg.threads)
        rank, world = self.dist.rank, self.dist.world_size
        self.stream = streams.build(cfg, r, self.data, self.task, self.augment, rank, world)
        checkpoint.set_rng_state(self.rng)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.model.to(self.device).train()
        if self.online:
            self.online.place(self.device, cfg.precision)
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
        self.agree = (
            self.task.teacher_rows(r, self.data, cfg.agree_rows or self.task.agree_rows)
            if r
            else None
        )

    # ----------------------------------------------------------------- one batch, one epoch

    def loss_terms(self, z, proj, batch) -> dict[str, torch.Tensor]:
        """The loss terms of one batch (stages/train/loss.py)."""
        return self.loss(z, proj, batch)

    def train_epoch(self, epoch: int, history: list) -> dict:
        self.stream.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        names = ("loss", "hard_loss", "soft_loss", "feature_loss", "relation_loss")
        # Loss sums weighted by rows, or by tokens for causal-lm (means per token), kept on the
        # device; the rows and tokens seen are counted on the host (no sync per step).
        sums = torch.zeros(len(names), dtype=sum_dtype(self.device), device=self.device)
        rows = tokens = 0
        first: list[torch.Tensor] = []  # the first steps' terms, read back after the epoch
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
                # Copied once: the forward, the LM / online teacher terms and the feature and
                # relation terms all read them (the to_device calls there are then no-ops).
                on_device = batch | {
                    k: to_device(batch[k], self.device) for k in ("input", "features") if k in batch
                }
                lm_batch = self.task.per_token
                if lm_batch:  # selected once, from the host's mask: no device sync
                    x = batch["input"]
                    on_device["positions"] = lm_loss.positions(
                        x["input_ids"], x["attention_mask"], target_mask(x)
                    ).to(self.device)
                with autocast(self.device, self.cfg.precision):
                    z, proj = self.ddp(on_device["input"])
                proj = None if proj is None else proj.float()
                # The chunked LM loss upcasts a chunk at a time: no full float32 copy of z.
                terms = self.loss_terms(z if lm_batch else z.float(), proj, on_device)
                self.opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                self.opt.step()
                self.sched.step()
                faults.point("train.batch")
                done += 1
                n = len(batch["sample_id"])
                t = on_device["positions"].tokens if lm_batch else 0  # host ints
                rows, tokens = rows + n, tokens + t
                step = torch.stack([terms[k].detach().to(sums.dtype) for k in names])
                sums += step * (t or n)
                if len(history) + len(first) < 64:
                    first.append(step)
        # The one read-back of the epoch's per-step terms (a sync per step otherwise).
        history.extend(dict(zip(names, v, strict=True)) for v in map(torch.Tensor.tolist, first))
        # A rank with fewer batches catches the shared schedule up, so LRs agree across ranks.
        for _ in range(self.steps - done):
            self.sched.step()
        counts = sums.new_tensor([rows, tokens])
        sums = reduce_sums(torch.cat([sums, counts]), self.dist.enabled).cpu()
        rows, tokens = int(sums[-2]), int(sums[-1])
        n = max(1.0, float(tokens or rows))
        out = {k: float(sums[i]) / n for i, k in enumerate(names)} | {
            "rows": rows,
            "tokens": tokens,
        }
        if self.online:
            # This rank's forward time, as precompute records its own rank's.
            out["teacher_seconds"] = self.online.take_seconds()
        return out

    def evaluate(self) -> dict:
        """The task's epoch metrics on --eval-data and against the first cached rows."""
        cfg, d = self.cfg, self.dist
        m = Measure(
            self.device, cfg.precision, cfg.eval_batch_size or self.task.eval_rows,
            cfg.eval_logits_mb, self.head, d.rank, d.world_size,
            lambda sums: reduce_sums(sums, d.enabled),
        )  # fmt: skip
        out = self.task.epoch_metrics(self.student, self.eval_data, self.agree, m, self.width)
        self.model.train()
        return out

    # ----------------------------------------------------------------- checkpoints, outputs

    def _parts(self) -> dict:
        return {
            "model": self.student,
            "projector": self.model.projector,
            "optimizer": self.opt,
            "scheduler": self.sched,
        }

    def resume(self) -> tuple[int, list, dict]:
        """(last finished epoch, its metrics rows, saved extras) from the newest checkpoint."""
        state = checkpoint.latest(self.folder)
        if state is None:
            return 0, [], {}
        changes = settings_diff(state["settings"], self.settings)
        if changes:
            raise UsageError(
                f"{self.cfg.out} holds checkpoints of a run with other settings "
                f"({'; '.join(changes)}): use another --out, or delete it to start over"
            )
        checkpoint.restore(state, self._parts())
        epoch, total = state["epoch"], self.cfg.epochs
        log.info(
            "resuming %s from checkpoint-%d.pt (epoch %d/%d)", self.cfg.out, epoch, epoch, total
        )
        return epoch, list(state["rows"]), state.get("extra", {})

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
            **run_totals(rows, self.task),
            # What the cache saves: the online teacher's forward time over all epochs.
            "online_teacher": self.online.identity if self.online else None,
            "teacher_seconds": (
                sum(row["teacher_seconds"] for row in rows) if self.online else None
            ),
        }

    # ----------------------------------------------------------------- the run

    def _tensorboard(self):
        loc = self.folder.loc
        if not self.dist.is_main or not loc.is_local:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        tb = SummaryWriter(os.path.join(loc.root, "tensorboard"))
        self.cleanup_stack.callback(tb.close)
        return tb

    def run(self, stop_after_epoch: int | None = None) -> dict:
        """setup, then train (or resume); returns {"status", "summary", "history", "rows"}.

        `stop_after_epoch` ends the run cleanly after that epoch, as a kill would (tests,
        schedulers).
        """
        self.setup()
        return self.train(stop_after_epoch)

    def train(self, stop_after_epoch: int | None = None) -> dict:
        cfg, d = self.cfg, self.dist
        started = self.started
        if d.is_main:
            self.folder.loc.sweep_temporaries()  # a killed run's half-written checkpoint
        first, rows, extra = self.resume()
        tb = self._tensorboard()
        history: list = []
        last = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
        for epoch in range(first + 1, last + 1):
            tick = time.perf_counter()
            train = self.train_epoch(epoch, history)
            seconds = time.perf_counter() - tick
            row = {
                "epoch": epoch,
                "step": epoch * self.steps,
                "lr": self.sched.get_last_lr()[0],
                **{k: v for k, v in train.items() if k not in ("rows", "tokens")},
                **self.evaluate(),
                "epoch_seconds": seconds,
                "samples_per_sec": train["rows"] / seconds if seconds else None,
            }
            if self.task.per_token:
                row["tokens_per_sec"] = train["tokens"] / seconds if seconds else None
            rows.append(row)
            faults.point("train.epoch")
            if d.is_main:
                log.info(epoch_line(row, cfg.epochs, self.task))
                extra["wall_seconds"] = (
                    extra.get("wall_seconds", 0.0) + time.perf_counter() - started
                )
                started = time.perf_counter()
                checkpoint.save(self.folder, epoch, self._parts(), rows, self.settings, extra)
                if tb is not None:
                    for k, v in row.items():
                        if k != "epoch" and v is not None:
                            tb.add_scalar(k, v, epoch)
            d.barrier()
        if last < cfg.epochs:
            return {"status": "stopped", "summary": None, "history": history, "rows": rows}
        summary = None
        if d.is_main:
            wall = extra.get("wall_seconds", 0.0) + time.perf_counter() - started
            self.folder.write_model(self.student.state_dict())
            faults.point("train.model")
            summary = self.summary(rows, wall)
            self.folder.write_summary(summary)
            faults.point("train.summary")
        d.barrier()
        return {"status": "done", "summary": summary, "history": history, "rows": rows}
