"""Stage two: train a student from a cache (or from hard labels alone), in one readable loop.

Loss per batch (formulas in stages/train/loss.py): ``alpha * soft + (1 - alpha) * hard + beta *
feature`` (``+ gamma * relation`` with ``--relation``, stages/train/relations.py; ``--pseudo-labels``
swaps the hard labels for the cached teacher's top-1); without ``--cache`` only the hard term, or
with ``--teacher`` the dense soft term against the teacher run online on the same batch
(stages/train/online.py); a regression student's soft and hard terms are MSE to the teacher's stored
outputs and to the stored true targets (stages/tasks/regression.py). A causal-lm student's hard term is
the next-token cross-entropy and its soft term is taken on the logits of the valid positions
(stages/tasks/causal_lm.py); its loss means and metrics are per token. AdamW with linear warmup then cosine decay, stepped per batch.
With a cache the student never sees the teacher: only the cache's manifest and shards are read.

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

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kdcache.stages.common import views
from kdcache.stages.common.config import TrainConfig, eval_rows
from kdcache.stages.common.device import autocast, sum_dtype, to_device
from kdcache.stages.common.hooks import FeatureTap
from kdcache.stages.evaluate.metrics import epoch_line, run_totals, summarise
from kdcache.stages.evaluate.run import (
    AgreementSet,
    dataset_batches,
    eval_sums,
    has_labels,
    reduce_sums,
)
from kdcache.stages.tasks import causal_lm as lm
from kdcache.stages.tasks import regression
from kdcache.stages.train import checkpoint, lm_head, lm_loss, relations
from kdcache.stages.train import loss as losses
from kdcache.stages.train.online import OnlineTeacher
from kdcache.stages.train.setup import (
    Distillee,
    finished,
    probe,
    run_settings,
    schedule,
    settings_diff,
)
from kdcache.stages.train.streams import JoinedStream, LabelStream, check_data
from kdcache.storage import faults
from kdcache.storage.codecs import token_targets
from kdcache.storage.errors import UsageError

log = logging.getLogger("kdcache.train")

# What callers (pipeline/jobs.py, tests) import from here; the build-up lives in train_setup.py.
__all__ = ["Distillee", "TrainConfig", "Trainer", "finished", "run_settings", "schedule"]


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
        self.cfg, self.dist, self.device, self.reader, self.folder = (
            cfg,
            dist,
            device,
            reader,
            folder,
        )
        self.data, self.eval_data, self.augment = data, eval_data, augment
        self.settings = run_settings(cfg, reader)
        self.task = cfg.task
        self.cleanup_stack = contextlib.ExitStack()
        try:
            self._build(student, teacher)
        except BaseException:
            self.cleanup()
            raise

    def _build(self, student: nn.Module, teacher: tuple | None) -> None:
        cfg, r = self.cfg, self.reader
        if self.eval_data is not None and self.task == "classification":
            has_labels(self.eval_data)
        if r and not cfg.ignore_fingerprint:  # (JoinedStream warns about an ignored mismatch)
            check_data(r, self.data)
        tap = None
        if cfg.beta > 0 or cfg.relation:
            tap = FeatureTap(student, cfg.student_features, cfg.pool, "--student-features")
            self.cleanup_stack.enter_context(tap)
        width, sdim = probe(student, self.data, tap, torch.device("cpu"), self.task)
        if r and width != r.num_classes:
            raise UsageError(
                f"--student {cfg.student} outputs {width} values per sample but the cache has "
                f"{r.num_classes} classes: pass --student-arg num_classes={r.num_classes} or so"
            )
        self.online = None
        if teacher is not None:
            self.online = OnlineTeacher(*teacher, self.task)
            tw, _ = probe(teacher[0], self.data, None, torch.device("cpu"), self.task, "--teacher")
            if tw != width:
                raise UsageError(
                    f"--teacher {cfg.teacher} outputs {tw} values per sample but --student "
                    f"{cfg.student} {width}: give the student the teacher's classes (vocabulary)"
                )
        self.head, self.chunk, self.plain = None, 0, False
        if (
            self.task == lm.TASK
        ):  # the chunked loss (stages/train/lm_loss.py), fused where it can be
            x = lm.inputs(self.data, np.arange(min(2, len(self.data))), self.task)
            # A plug-in codec without per-token targets keeps the plain loss (its soft_loss on
            # the valid tokens' full logits): nothing to fuse then.
            self.plain = r is not None and not r.codec.has_token_targets
            wanted = False if self.plain and not cfg.fused_head else cfg.fused_head
            self.head = lm_head.resolve(student, x, width, wanted, cfg.student)
            if self.plain and self.head is not None:
                raise UsageError(
                    f"--fused-head: the {r.codec.name} codec gives no per-token targets "
                    "(Codec.token_targets) for the fused loss: drop --fused-head"
                )
            self.chunk = lm_loss.chunk_tokens(cfg.loss_chunk_mb, width)
            lm_loss.chunk_tokens(cfg.eval_logits_mb, width, "--eval-logits-mb")
        self.student = student
        self.num_params = sum(p.numel() for p in student.parameters() if p.requires_grad)
        projector: nn.Module = nn.Identity()
        if cfg.beta > 0 and sdim != r.features_info["dim"]:
            projector = nn.Linear(sdim, r.features_info["dim"])
        self.model = Distillee(
            student, tap, projector, self.task, project=cfg.beta > 0, head=self.head
        )
        self.regression = None
        if self.task == regression.TASK:
            self.regression = regression.RegressionTerms(r, cfg)
            if self.eval_data is not None:
                regression.has_targets(self.eval_data, width)
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
        common = dict(seed=cfg.seed, rank=rank, world_size=world, num_workers=cfg.num_workers)
        if r:
            features = cfg.beta > 0 or cfg.relation is not None
            common.update(buffer_size=cfg.buffer_size, prefetch=cfg.prefetch, features=features)
            common.update(views.replay_options(r, cfg, self.augment))  # {} unless views
            stream = views.ViewStream if r.views else JoinedStream
            self.stream = stream(
                r,
                self.data,
                cfg.batch_size,
                ignore_fingerprint=cfg.ignore_fingerprint,
                pseudo_labels=cfg.pseudo_labels,
                **common,
            )
        else:
            # Online KD sees every row, as a cache's student does; hard labels only the labeled.
            self.stream = LabelStream(
                self.data, cfg.batch_size, task=self.task, every_row=cfg.online, **common
            )
        self.stream = views.on_the_fly(self.stream, self.augment, cfg)
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
        self.agree = None
        if r and self.task in ("classification", lm.TASK):
            self.agree = AgreementSet(r, self.data, cfg.agree_rows)
        elif r:
            self.agree = regression.TeacherRows(r, self.data, cfg.agree_rows)

    # ----------------------------------------------------------------- one batch, one epoch

    def loss_terms(self, z, proj, batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if self.task == regression.TASK:  # MSE to the teacher and to the true targets
            terms = self.regression(z, proj, batch, self.device)
        else:
            terms = self._kd_terms(z, proj, batch)
        rel = terms["loss"].new_zeros(())
        if cfg.relation:  # the student's features are the tap's, unprojected
            stored = to_device(batch["features"], self.device)
            rel = relations.relation_loss(cfg.relation, self.model.tap.value, stored)
            terms["loss"] = terms["loss"] + cfg.gamma * rel
        return terms | {"relation_loss": rel}

    def _kd_terms(self, z, proj, batch) -> dict[str, torch.Tensor]:
        cfg, r, dev = self.cfg, self.reader, self.device
        zero = z.new_zeros((), dtype=torch.float32)
        hard = soft = feat = zero
        if self.task == lm.TASK:
            return self._lm_terms(z, proj, batch)
        hard = losses.hard_loss(z, to_device(batch["label"], dev))
        if r:
            stored = {f.name: to_device(batch[f.name], dev) for f in r.codec.fields()}
            soft = r.codec.soft_loss(z, stored, r.temperature, cfg.temperature)
        elif self.online:
            soft = self.online.soft_loss(z, to_device(batch["input"], dev), cfg.temperature)
        if proj is not None:
            feat = losses.feature_loss(proj, to_device(batch["features"], dev))
        if not (r or self.online):
            total = hard
        else:
            total = cfg.alpha * soft + (1 - cfg.alpha) * hard + cfg.beta * feat
        return {"loss": total, "hard_loss": hard, "soft_loss": soft, "feature_loss": feat}

    def _lm_terms(self, out, proj, batch) -> dict[str, torch.Tensor]:
        """One chunked pass over the valid tokens (stages/train/lm_loss.py): `out` is the student's
        logits, or its last hidden states when its head is fused into the loss."""
        cfg, r, dev = self.cfg, self.reader, self.device
        pos = batch.get("positions")
        if pos is None:  # (the training loop selects them from the host's batch)
            x = batch["input"]
            pos = lm_loss.positions(
                x["input_ids"].cpu(), x["attention_mask"].cpu(), lm.target_mask(x).cpu()
            ).to(dev)
        targets, T = None, cfg.temperature or 1.0
        if self.plain:  # the loss before issue 22, for codecs that only have soft_loss
            x = to_device(batch["input"], dev)
            hard = lm.next_token_loss(
                out.float(), x["input_ids"], x["attention_mask"], lm.target_mask(x)
            )
            stored = {f.name: to_device(batch[f.name], dev) for f in r.codec.fields()}
            z = lm.valid_tokens(out.float(), lm.target_mask(x))
            soft = r.codec.soft_loss(z, stored, r.temperature, T)
            loss = cfg.alpha * soft + (1 - cfg.alpha) * hard
            return self._with_features(loss, hard, soft, proj, batch)
        if r:
            stored = {f.name: to_device(batch[f.name], dev) for f in r.codec.fields()}
            targets = r.codec.token_targets(stored, r.temperature, T, r.num_classes)
        elif self.online:
            z_t = self.online.logits(to_device(batch["input"], dev))
            z_t = z_t.reshape(-1, z_t.shape[-1]).index_select(0, pos.index)
            targets = token_targets.Dense(z_t, 1.0, T)  # the live logits, "stored" at T = 1
        w_soft = cfg.alpha if targets is not None else 0.0
        head = self.head.linear if self.head is not None else None
        loss, hard, soft = lm_loss.causal_lm_loss(out, pos, targets, T, 1 - w_soft, w_soft,
                                                  self.chunk, head)  # fmt: skip
        return self._with_features(loss, hard, soft, proj, batch)

    def _with_features(self, loss, hard, soft, proj, batch) -> dict[str, torch.Tensor]:
        feat = loss.new_zeros(())
        if proj is not None:
            feat = losses.feature_loss(proj, to_device(batch["features"], self.device))
            loss = loss + self.cfg.beta * feat
        return {"loss": loss, "hard_loss": hard, "soft_loss": soft, "feature_loss": feat}

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
                lm_batch = self.task == lm.TASK
                if lm_batch:  # selected once, from the host's mask: no device sync
                    x = batch["input"]
                    on_device["positions"] = lm_loss.positions(
                        x["input_ids"], x["attention_mask"], lm.target_mask(x)
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
        cfg, world, rank, task = self.cfg, self.dist.world_size, self.dist.rank, self.task
        out = {"eval_loss": None, "eval_accuracy": None, "eval_ece": None, "agreement": None}
        if task == regression.TASK:
            reduce = lambda s: reduce_sums(s, self.dist.enabled)  # noqa: E731
            out |= regression.metrics(
                self.student, self.device, self.reader.num_classes, cfg.precision,
                eval_rows(cfg.eval_batch_size, task), self.eval_data, self.agree, rank, world,
                reduce,
            )  # fmt: skip
            self.model.train()
            return out
        size, mb = eval_rows(cfg.eval_batch_size, task), cfg.eval_logits_mb
        if self.eval_data is not None and task in ("classification", lm.TASK):
            batches = dataset_batches(self.eval_data, size, rank, world, task)
            sums = eval_sums(self.student, batches, self.device, cfg.precision, task, mb, self.head)
            m = summarise(reduce_sums(sums, self.dist.enabled))
            out.update(eval_loss=m["loss"], eval_accuracy=m["accuracy"], eval_ece=m["ece"])
        if task == lm.TASK:
            out["eval_perplexity"] = lm.perplexity(out["eval_loss"])
        if self.agree is not None:
            batches = self.agree.batches(size, rank, world)
            sums = eval_sums(self.student, batches, self.device, cfg.precision, task, mb, self.head)
            out["agreement"] = summarise(reduce_sums(sums, self.dist.enabled))["accuracy"]
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
            **run_totals(rows),
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
            if self.task == lm.TASK:
                row["tokens_per_sec"] = train["tokens"] / seconds if seconds else None
            rows.append(row)
            faults.point("train.epoch")
            if d.is_main:
                log.info(epoch_line(row, cfg.epochs))
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
