"""`make lm-teacher-checkpoint`'s last step: the committed LM teacher's two files (weights and
card, see kdcache.pipeline.examples.lm_teacher) from a finished `kdcache train` folder."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from kdcache.pipeline.examples.lm_teacher import FORMAT, sha256_of, tokenizer_digests, write_marker
from kdcache.stages.train.run_folder import RunFolder
from kdcache.storage.errors import UsageError


def export(run: str, card: Path, command: str) -> dict:
    """The two committed files from a finished `kdcache train` folder of a GPT-2 teacher."""
    from safetensors.torch import save_file

    folder = RunFolder(run)
    summary = folder.summary()
    if summary is None:
        raise UsageError(f"{run} is not a finished `kdcache train` folder (no summary.json)")
    model = load_state(folder, summary)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    weights = card.with_suffix(".safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(weights), metadata={"format": "pt"})
    args = summary["settings"]["data_args"]
    doc = {
        "format": FORMAT,
        "weights": weights.name,
        "sha256": sha256_of(weights),
        "bytes": weights.stat().st_size,
        "text": tokenizer_digests(args["vocab"], args.get("max_bytes")),
        "rebuild": {
            "command": command,
            "train_seconds": round(summary["train_seconds"], 1),
            "threads": summary["settings"].get("threads"),
            "cpu": cpu_name(),
        },
        "summary": summary,
        "metrics": folder.rows(),
    }
    card.write_text(json.dumps(doc, indent=2) + "\n")
    # The trained folder now is the committed teacher: LM_TEACHER=committed keeps it as it is.
    write_marker(folder, card, doc)
    return doc


def cpu_name() -> str:
    """The CPU the rebuild ran on (its bits may differ on another: see the README)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_state(folder: RunFolder, summary: dict) -> torch.nn.Module:
    from kdcache.pipeline.examples.lm import gpt2

    model = gpt2(**summary["student_args"])
    state = torch.load(folder.model_url, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model
