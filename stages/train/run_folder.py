"""The one owner of a `kdcache train --out` folder, on any fsspec URL.

Files: `summary.json` (written last: its presence means the run finished), `model.pt` (the
student's state dict), `metrics.csv` (one row per finished epoch) and `checkpoint-N.pt` (what a
resume needs, see stages/train/checkpoint.py). Every write is atomic (kdcache.storage.fsio).
"""

from __future__ import annotations

import io
import json
import re

import torch

from kdcache.stages.train.run_log import csv_text, parse_csv
from kdcache.storage.fsio import Location, open_location

SUMMARY, MODEL, METRICS = "summary.json", "model.pt", "metrics.csv"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.pt$")


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class RunFolder:
    def __init__(self, url: str | Location, storage_options: dict | None = None):
        self.loc = url if isinstance(url, Location) else open_location(url, storage_options)

    @property
    def url(self) -> str:
        return self.loc.url

    @property
    def model_url(self) -> str:
        return f"{self.loc.url.rstrip('/')}/{MODEL}"

    @property
    def name(self) -> str:
        return self.loc.url.rstrip("/").rsplit("/", 1)[-1]

    # ----------------------------------------------------------------- a finished run

    def summary(self) -> dict | None:
        """summary.json, or None when the run has not finished."""
        if not self.loc.exists(SUMMARY):
            return None
        return json.loads(self.loc.read_bytes(SUMMARY))

    def finished_at(self) -> float:
        """When summary.json was written (seconds since the epoch)."""
        return self.loc.modified(SUMMARY)

    def write_summary(self, summary: dict) -> None:
        self.loc.write_bytes((json.dumps(summary, indent=2) + "\n").encode(), SUMMARY)

    def write_model(self, state_dict: dict) -> None:
        self.loc.write_bytes(torch_bytes(state_dict), MODEL)

    def rows(self) -> list[dict]:
        """metrics.csv parsed; empty when there is none."""
        return parse_csv(self.loc.read_bytes(METRICS).decode()) if self.loc.exists(METRICS) else []

    def write_rows(self, rows: list[dict]) -> None:
        self.loc.write_bytes(csv_text(rows).encode(), METRICS)

    # ----------------------------------------------------------------- checkpoints

    def checkpoint_epochs(self) -> list[int]:
        return sorted(int(m.group(1)) for n in self.loc.listdir() if (m := CHECKPOINT.match(n)))

    def write_checkpoint(self, epoch: int, state: dict) -> None:
        self.loc.write_bytes(torch_bytes(state), f"checkpoint-{epoch}.pt")

    def read_checkpoint(self, epoch: int) -> dict:
        data = self.loc.read_bytes(f"checkpoint-{epoch}.pt")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def prune_checkpoints(self, keep_after: int) -> None:
        """Delete every checkpoint of an epoch <= keep_after."""
        for epoch in self.checkpoint_epochs():
            if epoch <= keep_after:
                self.loc.remove(f"checkpoint-{epoch}.pt")
