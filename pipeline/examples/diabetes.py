"""Regression distillation on scikit-learn's diabetes data (442 patients, 10 features, a float
target: disease progression after a year), which ships inside scikit-learn: nothing is downloaded.

The job (`python -m kdcache.pipeline.examples.diabetes --out runs/diabetes`):

1. split the 442 rows once (seeded): 300 train rows with targets, 142 test rows;
2. fit the teacher on the 300 train rows: ridge regression in closed form, the best of the
   models tried on this data (a linear map; small MLPs trained on 300 noisy targets overfit);
3. run it once into two caches: `train` (the 300 rows, their targets kept) and `transfer` (the
   same 300 rows, then `transfer` mixup inputs without targets: convex mixes of two train
   inputs, the unlabelled inputs a teacher can label and the targets cannot);
4. train one small MLP student per loss: targets only (alpha 0), teacher only (alpha 1) and
   both (alpha 0.5) on `train`, and teacher only / both on `transfer`;
5. write the report (its regression table) to OUT/report.md.

Features are standardised with the train rows' mean and std; targets stay in their own units
(MSE in squared progression points), and the student's last layer is scaled to them
(`StudentMLP(mean, std)`) so that it starts at the train mean instead of 0.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from torch import nn

NUM_TEST, SPLIT_SEED = 142, 0


def _arrays() -> dict:
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(d.target))
    test, train = perm[:NUM_TEST], perm[NUM_TEST:]
    mean, std = d.data[train].mean(0), d.data[train].std(0)
    x = ((d.data - mean) / std).astype(np.float32)
    y = d.target.astype(np.float32)
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


class Diabetes:
    """Map-style `(x, target)` items; `split` "train" or "test". `transfer` > 0 appends that many
    mixup inputs of train rows, `(x, None)` items: rows a teacher labels and the targets do not."""

    def __init__(self, split: str = "train", transfer: int = 0, seed: int = 1):
        if split not in ("train", "test"):
            raise ValueError(f"split {split!r}: use 'train' or 'test'")
        a = _arrays()
        self.x, self.y = a[f"x_{split}"], a[f"y_{split}"]
        if transfer:
            rng = np.random.default_rng(seed)
            i, j = rng.integers(0, len(self.x), (2, transfer))
            lam = rng.uniform(0, 1, (transfer, 1)).astype(np.float32)
            self.x = np.concatenate([self.x, lam * self.x[i] + (1 - lam) * self.x[j]])
        self.labelled = len(self.y)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        y = float(self.y[i]) if i < self.labelled else None
        return torch.from_numpy(self.x[i]), y


class Teacher(nn.Module):
    """A linear map of the 10 features; its weights come from `fit_teacher` (a checkpoint)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(10, 1)

    def forward(self, x):
        return self.head(x)[:, 0]


def fit_teacher(path: str, ridge: float = 10.0) -> dict:
    """Ridge regression on the train rows in closed form; saves its state dict to `path`."""
    a = _arrays()
    x, y = a["x_train"].astype(np.float64), a["y_train"].astype(np.float64)
    xc, bias = x - x.mean(0), y.mean()
    w = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ (y - bias))
    model = Teacher()
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(w[None]))
        model.head.bias.fill_(float(bias - x.mean(0) @ w))
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        p = model(torch.from_numpy(a["x_test"])).double().numpy()
    t = a["y_test"]
    return {
        "test_mse": float(((p - t) ** 2).mean()),
        "test_mae": float(np.abs(p - t).mean()),
        "test_r2": float(1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum()),
    }


class StudentMLP(nn.Module):
    """10 -> hidden -> 1 with ReLU; the output is `mean + std * net(x)` in the targets' units."""

    def __init__(self, hidden: int = 32, mean: float = 0.0, std: float = 1.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x):
        return self.mean + self.std * self.net(x)[:, 0]


SPEC = "kdcache.pipeline.examples.diabetes"
# (name, cache, alpha): one student per loss; the same MLP, seed and epochs for each.
STUDENTS = (
    ("targets-only", "train", 0.0),
    ("teacher-only", "train", 1.0),
    ("both", "train", 0.5),
    ("teacher-only-transfer", "transfer", 1.0),
    ("both-transfer", "transfer", 0.5),
)


def run(out: str, epochs: int = 100, transfer: int = 3000, hidden: int = 32) -> dict:
    """The whole job into `out`; returns the report (report.json's content) and the teacher's
    test metrics under "teacher"."""
    from kdcache.pipeline import jobs
    from kdcache.stages.precompute.config import PrecomputeConfig
    from kdcache.stages.report.config import ReportConfig
    from kdcache.stages.train.config import TrainConfig

    os.makedirs(out, exist_ok=True)
    teacher = fit_teacher(f"{out}/teacher.pt")
    a = _arrays()
    scale = {"mean": float(a["y_train"].mean()), "std": float(a["y_train"].std())}
    caches = {"train": {}, "transfer": {"transfer": transfer}}
    for name, args in caches.items():
        jobs.precompute(
            PrecomputeConfig(
                teacher=f"{SPEC}:Teacher", checkpoint=f"{out}/teacher.pt",
                data=f"{SPEC}:Diabetes", data_args=args, out=f"{out}/cache/{name}",
                task="regression", dtype="float32", device="cpu", quiet=True,
            )
        )  # fmt: skip
    for name, cache, alpha in STUDENTS:
        jobs.train(
            TrainConfig(
                cache=f"{out}/cache/{cache}", student=f"{SPEC}:StudentMLP",
                student_args={"hidden": hidden, **scale}, data=f"{SPEC}:Diabetes",
                data_args=caches[cache], eval_data=f"{SPEC}:Diabetes",
                eval_data_args={"split": "test"}, alpha=alpha, normalize_targets=True,
                epochs=epochs, batch_size=32, lr=3e-3, out=f"{out}/students/{name}",
                device="cpu", threads=1, quiet=True,
            )
        )  # fmt: skip
    report = jobs.report(ReportConfig(runs=out, plots=False, agreement=False))
    return report | {"teacher_test": teacher}


def main(argv: list[str] | None = None) -> None:
    from kdcache.stages.report import regression as report_regression

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/diabetes")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--transfer", type=int, default=3000)
    args = p.parse_args(argv)
    report = run(args.out, args.epochs, args.transfer)
    t = report["teacher_test"]
    print(
        f"teacher (ridge, 11 params): test MSE {t['test_mse']:.4g} MAE {t['test_mae']:.4g} "
        f"R² {t['test_r2']:.3f}"
    )
    print(report_regression.table(report["regression"]).replace("**", ""))
    print(json.dumps({"written": report["written"]}))


if __name__ == "__main__":
    main()
