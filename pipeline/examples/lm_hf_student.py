"""The LM job's student trained by Hugging Face's `Trainer` (`kdcache.KDTrainer`) from a cache.

    python -m kdcache.pipeline.examples.lm_hf_student --cache STORE --out FOLDER
        --data SPEC [--data-arg k=v ...] --eval-data SPEC [--eval-data-arg k=v ...]
        --student SPEC [--student-arg k=v ...] [--epochs 3] [--batch-size 16] [--lr 3e-3]
        [--warmup 0.05] [--alpha 0.9] [--seed 0]

The same student, data, optimiser (AdamW, weight decay 0.01), schedule (linear warmup, then
cosine to zero) and loss (`kdcache.kd_loss`) as `kdcache train --cache STORE`, but the loop is
the stock `transformers.Trainer`'s. After every epoch the student is measured on the eval data by
the same code `kdcache train` uses, and FOLDER is written as a `kdcache train` run folder
(metrics.csv, model.pt, summary.json last), so `kdcache report` shows it beside the others. A
folder whose summary.json holds the same settings is left as it is ("already trained").
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch

import kdcache
from kdcache.stages import tasks
from kdcache.stages.tasks.base import Measure
from kdcache.stages.train.run_folder import RunFolder
from kdcache.stages.train.run_log import epoch_line, run_totals

TRAINER = "transformers.Trainer (kdcache.KDTrainer)"


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    for name in ("data", "eval-data", "student"):
        p.add_argument(f"--{name}", required=True)
        p.add_argument(f"--{name}-arg", action="append", default=[])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def _callback(state: dict):
    from transformers import TrainerCallback

    class Measured(TrainerCallback):
        """Measures the student on the eval data after each epoch, as `kdcache train` does."""

        def on_epoch_begin(self, args, st, control, **kw):
            state["started"] = time.perf_counter()

        def on_epoch_end(self, args, st, control, model=None, **kw):
            seconds = time.perf_counter() - state["started"]
            task, m = state["task"], state["measure"]
            out = task.epoch_metrics(model, state["eval"], None, m, state["width"])
            model.train()
            logged = [h for h in st.log_history if "loss" in h]
            # The last logged step's terms (nan before the first log: logging_steps = 10).
            nan = float("nan")
            last = logged[-1] if logged else {"loss": nan, "ce_loss": nan, "kd_loss": nan}
            row = {
                "epoch": round(st.epoch), "step": st.global_step,
                "lr": last.get("learning_rate"), "loss": last.get("loss"),
                "hard_loss": last.get("ce_loss"), "soft_loss": last.get("kd_loss"),
                "feature_loss": 0.0, "relation_loss": 0.0, "epoch_seconds": seconds,
                "samples_per_sec": state["rows"] / seconds,
                "tokens_per_sec": state["tokens"] / seconds,
            } | out  # fmt: skip
            state["rows_log"].append(row)
            print(epoch_line(row, state["epochs"], task), flush=True)

    return Measured()


def main(argv=None) -> dict:
    from transformers import TrainingArguments

    from kdcache.pipeline.data import load_dataset
    from kdcache.pipeline.models import load_model
    from kdcache.pipeline.specs import parse_kv

    a = _parse(argv)
    student_args = parse_kv(a.student_arg, "--student-arg")
    settings = {
        "trainer": TRAINER, "cache": a.cache, "alpha": a.alpha, "epochs": a.epochs,
        "batch_size": a.batch_size, "lr": a.lr, "warmup": a.warmup, "weight_decay": 0.01,
        "seed": a.seed, "data": a.data, "data_args": parse_kv(a.data_arg, "--data-arg"),
        "eval_data": a.eval_data, "eval_data_args": parse_kv(a.eval_data_arg, "--eval-data-arg"),
        "student_args": student_args, "task": "causal-lm",
    }  # fmt: skip
    folder = RunFolder(a.out)
    done = folder.summary()
    if done is not None and done.get("settings") == settings:
        print(f"{done['name']}: already trained ({a.out})")
        return done
    cache = kdcache.open_cache(a.cache)
    data = load_dataset(a.data, settings["data_args"])
    eval_data = load_dataset(a.eval_data, settings["eval_data_args"])
    torch.manual_seed(a.seed)
    model, _ = load_model(a.student, student_args, None, what="--student")
    task = tasks.get("causal-lm")
    from kdcache.pipeline.runtime import resolve_device

    device = resolve_device(a.device)
    train_set = cache.dataset(data)
    state = {
        "task": task, "eval": eval_data, "width": cache.info.num_classes, "epochs": a.epochs,
        "measure": Measure(device, "fp32", task.eval_rows), "rows_log": [],
        "rows": len(train_set), "tokens": cache.reader.manifest["stats"].get("tokens") or 0,
    }  # fmt: skip
    scratch = f"{folder.loc.root}/hf" if folder.loc.is_local else "/tmp/kdcache-hf-student"
    args = TrainingArguments(
        output_dir=scratch, per_device_train_batch_size=a.batch_size, num_train_epochs=a.epochs,
        learning_rate=a.lr, weight_decay=0.01, warmup_steps=a.warmup,
        lr_scheduler_type="cosine", logging_steps=10, save_strategy="no", report_to=[],
        seed=a.seed, data_seed=a.seed, use_cpu=device.type == "cpu",
        dataloader_num_workers=0, disable_tqdm=True, logging_strategy="steps",
    )  # fmt: skip
    trainer = kdcache.KDTrainer(
        model=model, args=args, train_dataset=train_set, alpha=a.alpha,
        callbacks=[_callback(state)],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    rows = state["rows_log"]
    folder.write_rows(rows)
    folder.write_model({k: v.detach().cpu() for k, v in model.state_dict().items()})
    summary = {
        "name": folder.name, "student": a.student, "student_args": student_args,
        "num_params": sum(p.numel() for p in model.parameters()), "cache": a.cache,
        "cache_fingerprint": cache.reader.fingerprint, "settings": settings, "epochs": a.epochs,
        "wall_seconds": wall, **run_totals(rows, task), "online_teacher": None,
        "teacher_seconds": None,
    }  # fmt: skip
    folder.write_summary(summary)  # last: the folder is a finished run only now
    shutil.rmtree(scratch, ignore_errors=True)
    final = summary["final"]
    print(f"trained {folder.name} with {TRAINER}: eval_loss {final['eval_loss']:.4f} "
          f"in {wall:.1f}s -> {a.out}")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
