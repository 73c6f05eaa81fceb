"""The `sampled` codec: N draws per token from the teacher, stored as unique ids and their counts.

Top-k targets are biased (the student never learns the tail the cache dropped); sampling N tokens
with replacement from ``softmax(z / T)`` and training on their empirical distribution
``counts / N`` is unbiased: the cross-entropy to it has the KL's gradient in expectation
(Sparse Logit Sampling, ACL 2025). At N = 50 a language model's token has ~12 unique ids.

Per token: ``sampled_n`` (uint8, unique ids drawn); per draw entry, ``sampled_ids`` (the narrowest
unsigned type holding V) and ``sampled_counts`` (uint8). Statistic: ``tv_sum``, the
total-variation distance of each token's empirical distribution from the teacher's.

Two samplers (the manifest's ``soft_labels.sampler``): 2, the default of new stores, draws on the
teacher's device from counter-based uniforms of (``sample_seed``, sample_id, view, position, draw)
(`draws.py`, specified in docs/FORMAT.md); 1 (stores without the key) drew row by row on the CPU
from a generator seeded by (``sample_seed``, sample_id, view). Given the same teacher logits both
write the same bytes for a rerun, a resume or another batch size (the logits themselves follow
the run's conditions: stages/precompute/conditions.py); they differ from each other, so the version is part
of the store's fingerprint and a resume never mixes them. The on-disk layout
(``soft_labels.layout``, `sampled_layout.py`) is versioned the same way: 2 in new stores (id
gaps, zstd), 1 without the key (the ids as they are).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from kdcache.storage.codecs import draws, register, token_targets
from kdcache.storage.codecs import sampled_layout as layout
from kdcache.storage.codecs.base import Codec, id_type, largest_fitting, torch_dtype
from kdcache.storage.codecs.losses import upcast
from kdcache.storage.errors import UsageError
from kdcache.storage.options import Option
from kdcache.storage.views import row_generator


def draw(p: torch.Tensor, n: int, g: torch.Generator) -> tuple:
    """Sampler 1: (unique ids, their counts, uniques per token) of n draws per row of p."""
    d = torch.multinomial(p, n, replacement=True, generator=g).sort(dim=1).values
    new = torch.ones_like(d, dtype=torch.bool)
    new[:, 1:] = d[:, 1:] != d[:, :-1]
    starts = new.reshape(-1).nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([d.numel()])])
    return d.reshape(-1)[starts], ends - starts, new.sum(1)


@register
class Sampled(Codec):
    name = "sampled"
    tasks = ("causal-lm",)
    options = (
        Option("samples", int, 50, "Draws per token by the sampled codec.", minimum=1, maximum=255),
        Option("sample_seed", int, 0, "Seed of the sampled codec's draws.", minimum=0),
    )
    stats_keys = ("mean_tv", "mean_unique")

    @property
    def n(self) -> int:
        return int(self.settings["samples"])

    @property
    def version(self) -> int:
        return int(self.settings.get("sampler", 1))

    @property
    def layout(self) -> int:
        return int(self.settings.get("layout", 1))

    @property
    def on_device(self) -> bool:
        return self.version >= 2

    @classmethod
    def configure(cls, values: dict, task: str) -> dict:
        return super().configure(values, task) | {
            "sampler": draws.VERSION,
            "layout": layout.VERSION,
        }

    @property
    def ids(self) -> pa.DataType:
        return id_type(self.num_classes)

    @classmethod
    def fit_budget(cls, budget: float, s: torch.Tensor, values: dict) -> dict:
        """The most draws whose columns, as layout 2 stores them (compressed: file bytes, not
        the payload), take at most `budget` bytes per token on the probe's tokens."""
        # Sampler 2's first n draws are the same for every N >= n: draw 255 once, on the probe's
        # device, then store each prefix a binary search asks for (the cost grows with N).
        tokens = torch.arange(len(s), device=s.device, dtype=torch.int64)
        keys = {"sample_id": tokens, "view": torch.zeros_like(tokens), "position": tokens}
        p, _ = draws.probabilities(s.float().clone())
        drawn = draws.draw(p, draws.token_words(0, keys, 255), sort=False)
        soft = {"dtype": values.get("dtype", "float16"), "num_classes": int(s.shape[-1])}
        soft |= cls.configure({}, "causal-lm")

        def cost(n: int) -> float:
            ids = drawn[:, :n].sort(dim=1).values.cpu().numpy()  # a sync per try, once per run
            codec = cls(soft | {"samples": n}, "causal-lm")
            return codec.stored_bytes_per_token(codec.finish({"draws": ids}), len(ids))

        lo = largest_fitting(cost, budget, 0, 255)  # cost(0) = 0
        if lo == 0:
            raise UsageError(
                f"--budget-bytes-per-token {budget:g} is below the sampled codec's minimum of "
                f"{cost(1):.2f} bytes per token (one draw, as stored) on this teacher: raise it"
            )
        return {"samples": lo}

    def token_fields(self) -> list[pa.Field]:
        return [
            pa.field("sampled_n", pa.uint8(), nullable=False),
            pa.field("sampled_ids", self.ids, nullable=False),
            pa.field("sampled_counts", pa.uint8(), nullable=False),
        ]

    def stored_token_fields(self) -> list[pa.Field]:
        own = self.token_fields()
        if self.layout >= 2:
            own[1] = pa.field(layout.GAPS, self.ids, nullable=False)
        return own

    def parquet_options(self) -> dict:
        return layout.parquet_options(self.sequence) if self.layout >= 2 else {}

    def groups(self) -> list[tuple[str, ...]]:
        return [("sampled_n",), ("sampled_ids", "sampled_counts")]

    def group_counts(self, columns: dict, lengths: np.ndarray) -> list[np.ndarray]:
        per_token = columns["sampled_n"]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        per_row = np.add.reduceat(per_token, starts) if len(per_token) else per_token
        return [lengths, np.where(lengths > 0, per_row, 0)]

    def work_bytes(self, num_classes: int) -> int:
        return 8 * num_classes + 64 * self.n  # the int64 cumulative sums; per-draw words, ids

    def encode_device(self, s: torch.Tensor, tokens: dict | None = None, work=None) -> tuple:
        p, lse = draws.probabilities(s)  # 2^40 p, over s
        words = draws.token_words(int(self.settings["sample_seed"]), tokens, self.n)
        ids = draws.draw(p, words, work=work)
        tv = draws.total_variation(p, ids, draws.SCALE)
        acc = torch.float32 if s.device.type == "mps" else torch.float64  # mps has no float64
        # Sorted draws at the stored id width (2 or 4 bytes each) cross to the host as they are:
        # their run-length form (`finish`) has a data-dependent size, which would cost a sync.
        columns = {"draws": ids.to(torch_dtype(self.ids, ids.device))}
        stats = {"tv_sum": tv.to(acc).sum(), "unique_sum": (ids[:, 1:] != ids[:, :-1]).sum()}
        stats["unique_sum"] = stats["unique_sum"] + len(ids)
        return columns, stats, torch.isfinite(lse)

    def finish(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "draws" not in columns:
            return columns
        ids, counts, per = draws.runs(columns["draws"])
        return {"sampled_ids": ids, "sampled_counts": counts, "sampled_n": per}

    def encode(self, s: torch.Tensor, keys: dict | None = None) -> tuple[dict, dict]:
        if self.version >= 2:
            return super().encode(s.float().clone(), keys)
        p = torch.softmax(s.float(), -1).cpu()
        out = {"sampled_ids": [], "sampled_counts": [], "sampled_n": []}
        tv = 0.0
        a = 0
        for sid, view, length in zip(keys["sample_id"], keys["view"], keys["length"], strict=True):
            rows = p[a : a + int(length)]
            a += int(length)
            ids, counts, per = draw(
                rows, self.n, row_generator(self.settings["sample_seed"], sid, view)
            )
            tok = torch.repeat_interleave(torch.arange(len(rows)), per)
            q = rows[tok, ids]
            # TV = 1/2 (sum over drawn ids |c/N - p| + the teacher mass on ids never drawn)
            tv += 0.5 * float(((counts / self.n - q).abs().sum() + len(rows) - q.sum()).double())
            out["sampled_ids"].append(ids.numpy())
            out["sampled_counts"].append(counts.numpy())
            out["sampled_n"].append(per.numpy())
        cols = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()}
        return cols, {"tv_sum": tv, "unique_sum": int(cols["sampled_n"].sum())}

    def token_arrays(self, columns: dict[str, np.ndarray]) -> list[pa.Array]:
        width = self.ids.to_pandas_dtype()
        # Off the CPU ids arrive as the signed type of their width: unsigned first, same bits.
        ids = columns["sampled_ids"].astype(width)
        if self.layout >= 2:
            ids = layout.gaps(ids, columns["sampled_n"]).astype(width)
        return [
            pa.array(columns["sampled_n"].astype(np.uint8)),
            pa.array(ids),
            pa.array(columns["sampled_counts"].astype(np.uint8)),
        ]

    def decode(self, table: pa.Table) -> dict[str, np.ndarray]:
        out = super().decode(table)
        if self.layout >= 2:
            ids = layout.ids_from_gaps(out.pop(layout.GAPS), out["sampled_n"])
            out = {f.name: ids if f.name == "sampled_ids" else out[f.name] for f in self.fields()}
        return out

    def summarise(self, totals: dict) -> dict:
        tokens = totals.get("tokens") or totals.get("rows", 0)
        if "tv_sum" not in totals or not tokens:
            return {}
        return {"mean_tv": totals["tv_sum"] / tokens, "mean_unique": totals["unique_sum"] / tokens}

    def label(self) -> str:
        return f"{self.n} draws per token over {self.num_classes} tokens (unique ids + counts)"

    def error_text(self, stats: dict) -> str | None:
        tv = stats.get("mean_tv")
        if tv is None:
            return None
        return (
            f"mean total-variation distance of the {self.n}-draw distribution {tv:.3f} "
            f"({stats.get('mean_unique', 0):.1f} unique ids per token)"
        )

    def soft_loss(self, student_logits, batch, stored_T, T):
        """``T^2 * mean_t CE(counts_t / N, softmax(z_s,t / T))``: the cross-entropy to each token's
        empirical distribution (its expectation's gradient is the KL's to the full teacher)."""
        self._check_temperature(stored_T, T)
        log_q = F.log_softmax(upcast(student_logits) / T, dim=-1)
        per = batch["sampled_n"].long()
        tok = torch.repeat_interleave(torch.arange(len(per), device=per.device), per)
        w = batch["sampled_counts"].to(log_q.dtype) / self.n
        picked = log_q[tok, batch["sampled_ids"].long()]
        return -(w * picked).sum() / max(1, len(per)) * T**2

    def token_targets(self, batch, stored_T, T, num_classes: int, dtype=torch.float32):
        """The chunked causal-lm loss's targets (`token_targets.Sparse`): each token's unique
        draws with weights count / N, padded to N per token (its most possible uniques)."""
        self._check_temperature(stored_T, T)
        w = batch["sampled_counts"].to(dtype) / self.n
        return token_targets.Sparse.from_ragged(batch["sampled_n"], batch["sampled_ids"], w, self.n)

    def _check_temperature(self, stored_T, T) -> None:
        if abs(T - stored_T) > 1e-9 * stored_T:
            raise UsageError(
                f"--temperature {T:g}: the sampled codec stored draws from the teacher at "
                f"T = {stored_T:g} and cannot re-temper them; train with --temperature {stored_T:g}"
            )

    def teacher_top1(self, columns: dict) -> np.ndarray:
        per = np.asarray(columns["sampled_n"], np.int64)
        tok = np.repeat(np.arange(len(per)), per)
        order = np.lexsort((-np.asarray(columns["sampled_counts"]), tok))
        first = np.concatenate([[0], np.cumsum(per)[:-1]]).astype(np.int64)
        return np.asarray(columns["sampled_ids"], np.int64)[order][first]
