"""Stage one's encoding on the teacher's device, in the main thread, right after the forward.

A causal LM's logits (B, L, V) never leave the device and are never copied whole: the real tokens
are encoded in chunks of at most `--encode-chunk-bytes` of work, and only each chunk's compact
columns (already at their stored widths) are copied to the host, into pinned buffers with
non-blocking copies on CUDA. Statistics stay on the device, summed per shard, and are read once
when the shard ends (`DeviceStats.read`), so the forward of the next batch is queued while the
copies run. The writer thread and its queue only ever see host arrays (`TeacherBatch`, `ShardEnd`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache.stages.precompute.encode import _refuse_non_finite
from kdcache.stages.tasks.causal_lm import target_mask
from kdcache.storage.codecs.base import Workspace, token_keys
from kdcache.storage.errors import UsageError


@dataclass
class TeacherBatch:
    """One teacher batch encoded, ready for the writer: host arrays only (the queue's item)."""

    columns: dict  # row keys, labels and any finished codec columns
    chunks: list = field(default_factory=list)  # codec columns per token chunk, to `finish`
    features: np.ndarray | None = None
    stats: dict = field(default_factory=dict)  # additive, known on the host
    # CUDA events after the copies (one per device copied from): the writer waits on them.
    ready: list = field(default_factory=list)

    def wait(self) -> None:
        for event in self.ready:
            if event is not None:
                event.synchronize()


@dataclass
class ShardEnd:
    """Commit the open shard, adding the statistics the device summed over it."""

    stats: dict


def to_host(t: torch.Tensor, work: Workspace | None = None) -> np.ndarray:
    """A device tensor as a host array: a pinned buffer and a non-blocking copy on CUDA (wait on
    an event before reading it), a plain blocking copy elsewhere, no copy on the CPU unless `t`
    is one of `work`'s buffers (a codec may hand back its input chunk, e.g. dense's no-op
    float32 cast: the next chunk would overwrite the host column)."""
    if t.device.type == "cpu":
        return (t.clone() if work is not None and work.holds(t) else t.contiguous()).numpy()
    cuda = t.device.type == "cuda"
    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
    buf.copy_(t, non_blocking=cuda)
    return buf.numpy()


def to_device(a, device: torch.device) -> torch.Tensor:
    """A small host array or CPU tensor on `device`: through pinned memory, non-blocking, on
    CUDA (a copy from pageable memory can wait for the stream, i.e. for the forward)."""
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def copied_event(device: torch.device):
    """An event after every copy queued so far on `device`'s stream (None off CUDA)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class DeviceStats:
    """Additive statistics summed on the device over one shard, read back once."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.bad: list[tuple[np.ndarray, torch.Tensor]] = []  # (sample ids, non-finite tokens)

    def add(self, stats: dict) -> None:
        for key, value in stats.items():
            self.sums[key] = value if key not in self.sums else self.sums[key] + value

    def read(self) -> dict:
        """The shard's sums as Python numbers; refuses the shard if a token was non-finite."""
        keys = list(self.sums)
        bad = [b.sum() for _, b in self.bad]
        out: dict = {}
        groups: dict = {}
        for key in keys:
            groups.setdefault(self.sums[key].dtype, []).append(key)
        if bad:
            groups.setdefault(bad[0].dtype, []).append("_bad")
        total_bad = torch.stack(bad).sum() if bad else None
        for names in groups.values():
            values = [total_bad if n == "_bad" else self.sums[n] for n in names]
            # The one host sync per shard (per dtype): every statistic of the shard at once.
            for name, value in zip(names, torch.stack(values).cpu().tolist(), strict=True):
                out[name] = value
        self.sums, bad_rows = {}, self.bad
        self.bad = []
        if out.pop("_bad", 0):
            for ids, rows in bad_rows:  # error path only: find the first batch with a bad row
                _refuse_non_finite(rows.bool(), ids)
        return out


def chunk_tokens(codec, vocab: int, teacher_itemsize: int, budget: int) -> int:
    """Tokens per chunk: the float32 copy of the chunk's logits plus the codec's own work."""
    cast = teacher_itemsize * vocab if teacher_itemsize != 4 else 0
    per_token = 4 * vocab + max(cast, codec.work_bytes(vocab))
    if budget < per_token:
        raise UsageError(
            f"--encode-chunk-bytes {budget} is below one token's encoding work ({per_token:,} "
            f"bytes for the {codec.name} codec at a vocabulary of {vocab:,}): raise it to at "
            f"least {per_token}"
        )
    return budget // per_token


def encode_sequences(
    z, inputs, ids, codec, temperature, stats: DeviceStats, budget: int | None, work: Workspace
) -> TeacherBatch:
    """A causal-LM batch (logits z (B, L, V) on the teacher's device) as host columns.

    Only target tokens (`target_mask`: the real ones, or a chat row's positions before an
    assistant token) are stored, row-major, each row with its `length`. The teacher's accuracy is
    next-token top-1 over stored positions whose next token is real."""
    real = inputs["attention_mask"].cpu().numpy().astype(bool)  # the loader's: on the host
    mask = target_mask(inputs).cpu().numpy().astype(bool)
    b, length, vocab = z.shape
    lengths = mask.sum(1).astype(np.int32)
    keys = {"sample_id": ids, "view": np.zeros(len(ids), np.int32), "length": lengths}
    nxt = mask[:, :-1] & real[:, 1:]
    host = {
        "rows": len(ids),
        "tokens": int(lengths.sum()),
        "tokens_seen": int(real.sum()),
        "labeled": int(nxt.sum()),
    }
    dev = z.device
    columns = dict(keys, label=np.full(len(ids), -1, np.int64))
    if not codec.on_device:  # a codec with only the host `encode`: the old, whole-batch path
        hit = z[:, :-1].argmax(-1) == inputs["input_ids"][:, 1:].to(dev)
        stats.add({"teacher_correct": (hit & torch.from_numpy(nxt).to(dev)).sum()})
        s = z.float()[torch.from_numpy(mask).to(dev)] / temperature
        cols, codec_stats = codec.encode(s, keys)
        return TeacherBatch(columns=cols | columns, stats=host | codec_stats)
    flat = np.flatnonzero(mask.reshape(-1))
    # Each stored token's next token where that is real too (-1: not counted); the top-1 is
    # taken per chunk, while the chunk is in cache.
    follow = np.full(mask.shape, -1, np.int64)
    follow[:, :-1] = np.where(nxt, inputs["input_ids"][:, 1:].cpu().numpy(), -1)
    follow = to_device(follow.reshape(-1)[flat], dev)
    if budget is None:  # cache-sized chunks on the CPU; on an accelerator, few large ones
        budget = 32 << 20 if dev.type == "cpu" else 1 << 30
    per = chunk_tokens(codec, vocab, z.element_size(), budget)
    tokens = {k: to_device(v, dev) for k, v in token_keys(keys).items()}
    where = to_device(flat, dev)
    rows = where // length
    logits = z.reshape(b * length, vocab)
    bad = torch.zeros(len(ids), dtype=torch.int32, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    chunks = []
    for a in range(0, max(1, len(flat)), per):
        sel = slice(a, a + per)
        n = len(where[sel])
        s = work.get("s", (n, vocab), torch.float32, dev)  # float32: every codec's precision
        if z.dtype == torch.float32:
            torch.index_select(logits, 0, where[sel], out=s)
        else:
            s.copy_(
                torch.index_select(
                    logits, 0, where[sel], out=work.get("z", (n, vocab), z.dtype, dev)
                )
            )
        correct = correct + (s.argmax(-1) == follow[sel]).sum()  # before / T: z's own top-1
        if temperature != 1:
            s.div_(temperature)
        got = codec.encode_device(s, {k: v[sel] for k, v in tokens.items()}, work)
        cols, codec_stats, finite = got
        stats.add(codec_stats)
        bad.index_add_(0, rows[sel], (~finite).int())
        chunks.append({k: to_host(v, work) for k, v in cols.items()})
    stats.bad.append((ids, bad))
    stats.add({"teacher_correct": correct})
    return TeacherBatch(columns=columns, chunks=chunks, stats=host, ready=[copied_event(dev)])
