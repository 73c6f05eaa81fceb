"""Map-style datasets as kdcache sees them: batches of (inputs, labels) fetched by index array.

Classifier and regression items stack into one tensor; causal-lm items are token ids of any
length (a 1-D integer array, or a dict with `input_ids` and an optional 0/1 `attention_mask`),
right-padded per batch into `{"input_ids", "attention_mask"}`, and `forward_tokens` hands those to
a model.
"""

from __future__ import annotations

import functools
import hashlib
import inspect

import numpy as np
import torch

from kdcache.storage.errors import UsageError

FINGERPRINT_SAMPLES = 64


def _split_item(item, spec: str):
    if isinstance(item, dict):
        if "input" not in item:
            raise UsageError(f"--data {spec!r}: dict items need an 'input' key, got {list(item)}")
        return item["input"], item.get("label")
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], item[1]
    return item, None


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _class_label(y) -> int:
    """An integer class id, or -1 for anything else (regression targets, vectors, None)."""
    a = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if a.ndim != 0 or a.dtype.kind not in "iuf" or not float(a).is_integer():
        return -1
    return int(a)


def _numpy(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)


def _token_ids(x, spec: str, sid, ndim: int = 1) -> np.ndarray:
    """Token ids as int64, checked: `ndim` dims (1 per item, 2 per vectorised batch), non-empty,
    integer."""
    a = _numpy(x)
    if a.ndim != ndim:
        want = "(L,) per sample" if ndim == 1 else "(B, L) per batch"
        raise UsageError(
            f"--data {spec!r} sample {sid}: input_ids has shape {a.shape}; causal-lm needs token "
            f"ids {want}: drop or add the batch dimension"
        )
    if a.size == 0:
        raise UsageError(f"--data {spec!r} sample {sid}: input_ids is empty; drop empty samples")
    if a.dtype.kind not in "iu":
        raise UsageError(
            f"--data {spec!r} sample {sid}: input_ids are {a.dtype}, not integers; "
            "return integer token ids (e.g. torch.long)"
        )
    return a.astype(np.int64, copy=False)


def _token_mask(mask, ids: np.ndarray, spec: str, sids) -> np.ndarray:
    """The attention mask as int64 of the ids' shape (all ones when there is none), checked."""
    if mask is None:
        return np.ones_like(ids)
    mask = _numpy(mask)
    if mask.shape != ids.shape:
        raise UsageError(
            f"--data {spec!r} sample {sids[0]}: attention_mask has shape {mask.shape} but "
            f"input_ids {ids.shape}; give one mask value per token"
        )
    bad = ~((mask == 0) | (mask == 1))
    if bad.any():
        row = int(np.argwhere(bad.reshape(len(sids), -1))[0, 0])
        raise UsageError(
            f"--data {spec!r} sample {sids[row]}: attention_mask holds values other than 0 and 1;"
            " use 1 for real tokens and 0 for padding"
        )
    return mask.astype(np.int64)


def _target_mask(labels, ids: np.ndarray, mask: np.ndarray, spec: str, sids) -> np.ndarray:
    """HF-style `labels` (-100 where a token is not learned, else the token itself) as the
    positions that predict a target: ``target[t] = labels[t + 1] != -100`` (causal shift)."""
    labels = _numpy(labels)
    if labels.shape != ids.shape:
        raise UsageError(
            f"--data {spec!r} sample {sids[0]}: labels has shape {labels.shape} but input_ids "
            f"{ids.shape}; give one label per token (-100 where it is not learned)"
        )
    learned = (labels != -100) & (mask == 1)
    if (labels[learned] != ids[learned]).any():
        row = int(np.argwhere((learned & (labels != ids)).reshape(len(sids), -1))[0, 0])
        raise UsageError(
            f"--data {spec!r} sample {sids[row]}: labels differ from input_ids where they are "
            "not -100; kdcache learns each token from its own id: use -100 or the token id"
        )
    target = np.zeros_like(ids)
    target[..., :-1] = learned[..., 1:]
    return target


def _token_item(item, spec: str, sid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One sample's (input_ids, attention_mask, target_mask or None), int64 (L,)."""
    mask = labels = None
    if isinstance(item, dict):
        if "input_ids" not in item:
            raise UsageError(
                f"--data {spec!r} sample {sid}: causal-lm dict items need an 'input_ids' key, "
                f"got {list(item)}"
            )
        item, mask, labels = item["input_ids"], item.get("attention_mask"), item.get("labels")
    elif isinstance(item, tuple):
        raise UsageError(
            f"--data {spec!r} sample {sid} is a tuple (a classifier's (input, label) item?): "
            "causal-lm needs token ids (L,) or {'input_ids': ...}; check --data and --task"
        )
    ids = _token_ids(item, spec, sid)
    mask = _token_mask(mask, ids, spec, [sid])
    return ids, mask, None if labels is None else _target_mask(labels, ids, mask, spec, [sid])


def _token_batch(ds, ids: np.ndarray, spec: str) -> tuple[dict, np.ndarray]:
    """`{"input_ids", "attention_mask"}` int64 (B, Lmax), right-padded with 0, labels all -1;
    plus `target_mask` when the data set gives HF-style `labels` (chat data)."""
    labels = np.full(len(ids), -1, np.int64)
    if hasattr(ds, "get_batch"):
        batch = ds.get_batch(ids)
        x = _token_ids(batch["input_ids"], spec, int(ids[0]), ndim=2)
        mask = _token_mask(batch.get("attention_mask"), x, spec, ids)
        got = batch.get("labels")
        target = None if got is None else _target_mask(got, x, mask, spec, ids)
    else:
        rows = [_token_item(ds[int(i)], spec, int(i)) for i in ids]
        x = np.zeros((len(rows), max(len(t) for t, _, _ in rows)), np.int64)
        mask = np.zeros_like(x)
        target = None if all(r[2] is None for r in rows) else np.zeros_like(x)
        for j, (t, m, g) in enumerate(rows):
            x[j, : len(t)], mask[j, : len(m)] = t, m
            if target is not None:
                target[j, : len(t)] = m if g is None else g
    # Copies: the data set's own arrays may be read-only, and callers may write to a batch.
    out = {"input_ids": torch.tensor(x), "attention_mask": torch.tensor(mask)}
    if target is not None:
        out["target_mask"] = torch.tensor(target)
    return out, labels


@functools.cache
def _takes_mask(cls: type) -> bool:
    return "attention_mask" in inspect.signature(cls.forward).parameters


def forward_tokens(model: torch.nn.Module, inputs: dict):
    """`model(input_ids, attention_mask=mask)` when its forward names `attention_mask`, else
    `model(input_ids)`: a plain causal module needs no mask, as right padding never reaches a
    valid position. Wrappers (DDP's `.module`, torch.compile's `._orig_mod`) are judged by the
    model they wrap.
    """
    inner = model
    while isinstance(inner, torch.nn.parallel.DistributedDataParallel) or hasattr(
        inner, "_orig_mod"
    ):
        inner = inner._orig_mod if hasattr(inner, "_orig_mod") else inner.module
    if _takes_mask(type(inner)):
        return model(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return model(inputs["input_ids"])


def _label_array(labels) -> np.ndarray:
    """A batch's labels as an array; a list mixing vectors and None (regression targets, some
    missing) becomes one object per item instead of a ragged-array error."""
    if isinstance(labels, np.ndarray | torch.Tensor):
        return np.asarray(labels)
    out = np.empty(len(labels), object)
    for j, v in enumerate(labels):
        out[j] = v
    return out if any(v is None or np.ndim(v) for v in out) else np.asarray(list(out))


def get_batch(
    ds, ids: np.ndarray, spec: str = "data", tokens: bool = False
) -> tuple[torch.Tensor | dict, np.ndarray]:
    """Inputs stacked into one tensor and int64 labels (-1 where an item has none).

    For token data (`tokens`: a causal-lm task's) the inputs are `{"input_ids", "attention_mask"}` int64 (B, Lmax),
    right-padded with id 0 and mask 0 to the batch's longest item, and the labels are all -1.

    Only integer class ids count as labels; regression targets are not stored (a regression
    student distils from the teacher's stored outputs).

    Datasets with a vectorised `get_batch(ids) -> {"input", "label"}` (causal-lm: `{"input_ids",
    "attention_mask"}`) skip the per-item loop.
    """
    if tokens:
        return _token_batch(ds, ids, spec)
    if hasattr(ds, "get_batch"):
        batch = ds.get_batch(ids)
        labels = batch.get("label")
        labels = np.full(len(ids), -1, np.int64) if labels is None else _label_array(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            labels = np.array([_class_label(v) for v in labels], np.int64)
        return _as_tensor(batch["input"]), labels.astype(np.int64, copy=False)
    xs, ys = [], np.full(len(ids), -1, np.int64)
    for j, i in enumerate(ids):
        x, y = _split_item(ds[int(i)], spec)
        xs.append(_input_tensor(x, spec, int(i)))
        if y is not None:
            ys[j] = _class_label(y)
    return _stack(xs, ids, spec), ys


def _input_tensor(x, spec: str, sid: int) -> torch.Tensor:
    try:
        return _as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise UsageError(
            f"--data {spec!r} sample {sid}: the input is a {type(x).__name__} ({str(x)[:40]!r}), "
            "not numbers: return a tensor or array (and the label), e.g. (x, y)"
        ) from None


def _stack(xs: list[torch.Tensor], ids: np.ndarray, spec: str) -> torch.Tensor:
    shapes = [tuple(x.shape) for x in xs]
    odd = next((j for j, s in enumerate(shapes) if s != shapes[0]), None)
    if odd is not None:
        raise UsageError(
            f"--data {spec!r}: sample {int(ids[odd])} has shape {shapes[odd]} but sample "
            f"{int(ids[0])} {shapes[0]}; one batch needs one shape: pad or resize the inputs "
            "(token blocks of any length: --task causal-lm)"
        )
    return torch.stack(xs)


class BatchView(torch.utils.data.Dataset):
    """Index by an array of ids, so a DataLoader with a batch sampler fetches whole batches."""

    def __init__(self, ds, spec: str = "data", tokens: bool = False):
        self.ds = ds
        self.spec = spec
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, ids):
        x, y = get_batch(self.ds, np.asarray(ids, dtype=np.int64), self.spec, self.tokens)
        return torch.as_tensor(np.asarray(ids, dtype=np.int64)), x, torch.from_numpy(y)


def _is_token_data(ds) -> bool:
    """Items (or a vectorised batch) carrying `input_ids`. Bare 1-D integer items are not taken
    for tokens: an unlabeled text classifier has those too, so such callers pass the task."""
    if len(ds) == 0:
        return False
    first = ds.get_batch(np.zeros(1, np.int64)) if hasattr(ds, "get_batch") else ds[0]
    return isinstance(first, dict) and "input_ids" in first


def data_fingerprint(ds, tokens: bool | None = None, spec: str = "data") -> str:
    """Content hash of the data set: its length and FINGERPRINT_SAMPLES evenly spaced items.

    Content, not spec, so that the same data reached through another wrapper still matches, and
    sampled so that a student can check it in well under a second on any size of data set.
    Token data (`tokens`, or items with `input_ids` when `tokens` is None) hashes the
    padded ids and masks (and target masks) of those items. A data set that knows its whole
    content cheaply (`kdcache.text_dataset`: its files' bytes, tokenizer and settings) declares
    it as a `fingerprint` string, which is hashed in too, so a change the samples miss shows.
    """
    n = len(ds)
    ids = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_SAMPLES)).astype(np.int64))
    h = hashlib.sha256()
    declared = getattr(ds, "fingerprint", None)
    if isinstance(declared, str):
        h.update(f"declared|{declared}|".encode())
    if tokens or (tokens is None and _is_token_data(ds)):
        inputs, _ = _token_batch(ds, ids, spec)
        x, mask = inputs["input_ids"], inputs["attention_mask"]
        h.update(f"causal-lm|{n}|{tuple(x.shape)}".encode())
        h.update(x.numpy().tobytes())
        h.update(mask.numpy().tobytes())
        if "target_mask" in inputs:
            h.update(inputs["target_mask"].numpy().tobytes())
        return h.hexdigest()
    x, y = get_batch(ds, ids, spec)
    h.update(f"{n}|{tuple(x.shape)}|{x.dtype}".encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.tobytes())
    return h.hexdigest()
