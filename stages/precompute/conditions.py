"""The conditions a shard was computed under, and the one-line warning when a resume differs.

A store's bytes follow the teacher's logits to the last bit, and those bits are not a function of
the settings alone: a CPU reduction splits its work by the thread count, kernels differ between
devices, ISA levels and torch/CUDA builds, and a batch's shape picks the kernel. So the promise is
conditional: a rerun or resume is byte-identical to an uninterrupted run given the same device
type, CPU thread count (and vector ISA), software, precision and batch plan. Each commit marker
records these; a resume under other ones still gives a valid store (every shard is a correct
encoding of its own teacher outputs), not a byte-identical one, and says so.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("kdcache.precompute")
FLAGS = {"threads": "--threads", "batch_size": "--batch-size"}  # conditions a flag restores


def conditions(device: torch.device, precision: str, batch_size: int) -> dict:
    """What, beside the fingerprinted settings, decides this process's shard bytes."""
    out = {
        "device": device.type,
        "torch": torch.__version__,
        "precision": precision,
        "batch_size": int(batch_size),
    }
    if device.type == "cpu":
        out["threads"] = torch.get_num_threads()
        # The vector ISA torch dispatches to (AVX2, AVX512, ...) changes reductions' rounding.
        capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
        if capability is not None:
            out["cpu_capability"] = capability()
    elif device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    return out


def differences(old: dict, new: dict) -> list[str]:
    """`key old -> new` for each condition that differs (a key only one side has included)."""
    return [
        f"{key} {old.get(key, '?')} -> {new.get(key, '?')}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def warn_if_resumed_elsewhere(url: str, recorded: dict[int, dict | None], now: dict) -> list[str]:
    """One warning line when a resume's conditions differ from its committed shards'; returns
    the differences (empty when there is nothing to say). `recorded` maps a committed shard to
    its marker's conditions (None: a store written before markers recorded them)."""
    if not recorded:
        return []
    seen: list[str] = []
    flags: list[str] = []  # the flags that bring a condition back, where a flag can
    unknown = 0
    for index in sorted(recorded):
        old = recorded[index]
        if old is None:
            unknown += 1
            continue
        for d in differences(old, now):
            if d not in seen:
                seen.append(d)
        for key, flag in FLAGS.items():
            if key in old and old[key] != now.get(key) and f"{flag} {old[key]}" not in flags:
                flags.append(f"{flag} {old[key]}")
    if not seen and not unknown:
        return []
    what = "; ".join(seen) if seen else f"{unknown} shard(s) recorded no conditions"
    hint = "rerun with " + " ".join(flags) if flags else ""
    log.warning(
        "warning: resuming %s under other conditions than its %d committed shard(s) (%s): the "
        "store stays valid but may not be byte-identical to an uninterrupted run%s",
        url,
        len(recorded),
        what,
        f"; {hint} to keep it identical" if hint else "",
    )
    return seen or [what]
