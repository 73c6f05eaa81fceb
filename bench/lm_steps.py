"""Stage two of the language-model bench: a student step from a sampled store, and its reader.

- step: a `CausalMix` student (dim 64, AdamW) over one epoch of a sampled store's batches, the
  inputs joined from the data set by sample id, loss `alpha * soft + (1 - alpha) * next-token CE`
  as stage two computes it (`stages/lm_loss.causal_lm_loss`, the student's head fused in);
  against the same student over the same token batches (same rows, same order) with plain CE
  on its full logits.
  Both time forward + loss + backward + optimizer step; the cached run also its loader.
- reader: `CacheStream` (shuffle on, and off) over a store of the sampled store's rows tiled to
  size, against the same packed arrays (per-row keys, per-token `sampled_n`, per-draw ids and
  counts) in `.npy` files opened with `np.load(mmap_mode="r")`, read batch by batch in the very
  row order the stream yielded (its row offsets precomputed, not timed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from bench.common import Report, interleaved, ratio
from bench.lm_models import Blocks, CausalMix, next_token_ce
from kdcache.stages.common.data import get_batch
from kdcache.stages.tasks import lm_loss
from kdcache.storage.fsio import open_location
from kdcache.storage.reader import CacheReader
from kdcache.storage.stream import CacheStream
from kdcache.storage.writer import StoreWriter

ALPHA, LR, DIM, SEED = 0.9, 1e-3, 64, 0
ROWS = ("sample_id", "view", "label", "length")


def step_contenders(report: Report, url: str, repeat: int) -> None:
    reader = CacheReader(url)
    data, v = Blocks(**reader.manifest["data"]["kwargs"]), reader.num_classes
    rows = max(1, min(4, reader.num_rows // 4))
    temp = reader.temperature
    stream = CacheStream(reader, batch_size=rows, seed=SEED, features=False)
    order = [b["sample_id"].numpy() for b in stream]
    fields = [f.name for f in reader.codec.token_fields()]
    chunk = lm_loss.chunk_tokens(lm_loss.CHUNK_MB, v)

    def trainer(cached: bool):
        torch.manual_seed(SEED)
        student = CausalMix(v, DIM).train()
        opt = torch.optim.AdamW(student.parameters(), lr=LR)

        def epoch() -> None:
            # the CE-only run takes the cached run's batches, same rows in the same order
            batches = stream if cached else ({"sample_id": torch.from_numpy(i)} for i in order)
            for batch in batches:
                x, _ = get_batch(data, batch["sample_id"].numpy(), tokens=True)
                ids, mask = x["input_ids"], x["attention_mask"]
                if cached:  # stage two's chunked loss with the student's head fused in
                    pos = lm_loss.positions(ids, mask)
                    stored = {k: batch[k] for k in fields}
                    targets = reader.codec.token_targets(stored, temp, temp, v)
                    loss = lm_loss.causal_lm_loss(student.hidden_states(ids), pos, targets, temp,
                                                  1 - ALPHA, ALPHA, chunk, student.head)[0]  # fmt: skip
                else:
                    loss = next_token_ce(student(ids), ids, mask)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return epoch

    names = {"next-token CE only": trainer(False), "from the cache (sampled, alpha 0.9)":
             trainer(True)}  # fmt: skip
    times = interleaved(names, repeat=repeat, warmup=1)
    ce = min(times["next-token CE only"])
    tokens = int(reader.manifest["stats"]["tokens"])
    t = report.table(
        f"student step at V = {v:,}: CausalMix(dim {DIM}) + AdamW, {len(order)} steps of "
        f"{rows} rows ({tokens // len(order):,} tokens) per epoch, forward + loss + backward + step",
        ["run", "ms/step (best)", "tokens/s", "vs CE only"],
    )
    for name, ts in times.items():
        t.add(name, 1000 * min(ts) / len(order), tokens / min(ts), ratio(min(ts), ce))
    cached = min(times["from the cache (sampled, alpha 0.9)"])
    report.target("student step from the cache / CE only", ratio(cached, ce), "<=", 1.10)


def tiled_store(src: CacheReader, url: str, rows: int, shard_rows: int) -> dict[str, np.ndarray]:
    """A store of `src`'s rows repeated up to `rows` (new sample ids); returns its columns."""
    parts = [src.read_shard(i, features=False) for i in range(len(src.shards))]
    one = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    reps = -(-rows // src.num_rows)
    entries = np.add.reduceat(
        one["sampled_n"].astype(np.int64), np.r_[0, np.cumsum(one["length"])[:-1]]
    )
    cols = {k: np.tile(one[k], reps) for k in one}
    cols["sample_id"] = np.arange(len(cols["sample_id"]), dtype=np.int64)
    header = {k: src.manifest[k] for k in ("format", "teacher", "temperature", "soft_labels",
                                           "features", "task", "precision")}  # fmt: skip
    header |= {"data": {**src.manifest["data"], "num_samples": rows}, "num_rows": rows,
               "shard_rows": shard_rows, "fingerprint": f"bench-lm-tiled-{rows}"}  # fmt: skip
    tok_end = np.cumsum(cols["length"][:rows].astype(np.int64))
    ent_end = np.cumsum(np.tile(entries, reps)[:rows])
    out = {k: cols[k][:rows] for k in ROWS}
    out["sampled_n"] = cols["sampled_n"][: tok_end[-1]]
    out["sampled_ids"] = cols["sampled_ids"][: ent_end[-1]]
    out["sampled_counts"] = cols["sampled_counts"][: ent_end[-1]]
    store = StoreWriter(open_location(url), header)
    store.prepare()
    tok0, ent0 = np.r_[0, tok_end], np.r_[0, ent_end]
    for i, a in enumerate(range(0, rows, shard_rows)):
        b = min(rows, a + shard_rows)
        part = {k: out[k][a:b] for k in ROWS}
        part["sampled_n"] = out["sampled_n"][tok0[a] : tok0[b]]
        for k in ("sampled_ids", "sampled_counts"):
            part[k] = out[k][ent0[a] : ent0[b]]
        with store.shard(i) as shard:
            shard.add(part)
            shard.stats = {"rows": b - a, "tokens": int(tok0[b] - tok0[a])}
    store.publish({"rows": rows})
    out["_tok"], out["_ent"] = tok0, ent0
    return out


def memmap_epoch(folder: Path, cols: dict, order: list[np.ndarray]):
    for k in (*ROWS, "sampled_n", "sampled_ids", "sampled_counts"):
        np.save(folder / f"{k}.npy", cols[k])
    mm = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in (*ROWS, "sampled_n",
                                                                  "sampled_ids", "sampled_counts")}  # fmt: skip
    tok, ent = cols["_tok"], cols["_ent"]

    def packed(name: str, starts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
            return np.array(mm[name][starts[rows[0]] : starts[rows[-1] + 1]])
        return np.concatenate([mm[name][starts[r] : starts[r + 1]] for r in rows.tolist()])

    def run() -> int:
        n = 0
        for rows in order:
            batch = {k: np.array(mm[k][rows]) for k in ROWS}
            batch["sampled_n"] = packed("sampled_n", tok, rows)
            for k in ("sampled_ids", "sampled_counts"):
                batch[k] = packed(k, ent, rows)
            n += int(torch.from_numpy(batch["length"]).sum())
            batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        return n

    return run


def reader_contenders(report: Report, src_url: str, work: Path, rows: int, repeat: int) -> None:
    src = CacheReader(src_url)
    url, folder = work / "tiled", work / "memmap"
    for p in (url, folder):
        shutil.rmtree(p, ignore_errors=True)
    folder.mkdir(parents=True)
    batch = 16
    cols = tiled_store(src, str(url), rows, max(batch, rows // 8))
    tokens = int(cols["length"].sum())
    contenders = {}
    for shuffle in (True, False):
        stream = CacheStream(str(url), batch_size=batch, shuffle=shuffle, seed=SEED, features=False)
        order = [b["sample_id"].numpy() for b in stream]
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)
        on = "on" if shuffle else "off"
        contenders[f"CacheStream, shuffle {on}"] = lambda lo=loader: sum(
            int(b["length"].sum()) for b in lo
        )
        contenders[f"numpy memmap, the stream's order (shuffle {on})"] = memmap_epoch(
            folder, cols, order
        )
    times = interleaved(contenders, repeat=repeat, warmup=1)
    best = {k: tokens / min(v) for k, v in times.items()}
    bpt = src.manifest["stats"]["bytes_per_token"]
    t = report.table(
        f"reader: one epoch of {rows:,} rows ({tokens:,} tokens, {bpt:.1f} B/token, "
        f"{tokens * bpt / 2**20:.0f} MB payload) in batches of {batch} rows, warm page cache",
        ["reader", "tokens/s (best)", "ours / memmap (same order)"],
    )
    for on in ("on", "off"):
        ours = best[f"CacheStream, shuffle {on}"]
        mem = best[f"numpy memmap, the stream's order (shuffle {on})"]
        t.add(f"CacheStream, shuffle {on}", ours, ratio(ours, mem))
        t.add(f"numpy memmap, the stream's order (shuffle {on})", mem, 1.0)
        report.target(f"reader shuffle {on} / memmap, same order", ratio(ours, mem), ">=", 0.5)
