"""`kdcache.text_dataset`: local text or chat files and an HF tokenizer as causal-lm rows.

A real entry point, not an example (hence here, beside `data.py`, not in `examples/`): it reads
jsonl / json / parquet / arrow files, or a `datasets.save_to_disk` folder, through Hugging Face
`datasets` (the `text` extra), offline, and tokenizes them with any tokenizer in a local folder.

- Plain text (`text_field`): each document's tokens followed by the EOS, packed into blocks of
  `block_size` (`packing=False`: one document per row, truncated to `block_size`).
- Chat (`messages_field`): one conversation per row through the tokenizer's chat template,
  truncated; items carry HF-style `labels` (-100 except on the assistant's tokens), which stage
  one and two turn into the positions whose soft labels are stored and learned (`target_mask`).

Splits are by document: a seeded permutation of the documents puts `validation_fraction` of them
in "validation", so the two splits never share one, whatever the packing. `fingerprint` covers
the files' bytes, the tokenizer's files and every setting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.pipeline.chat import assistant_labels, load_tokenizer, tokenizer_digest
from kdcache.storage.errors import UsageError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
SPLITS = ("train", "validation", "all")
# Rows' length when neither block_size nor the tokenizer's model_max_length says.
DEFAULT_BLOCK = 1024


def _files(path: str | Path | list) -> tuple[list[Path], str | None]:
    """The data files (sorted) and their `datasets` builder, or a save_to_disk folder (None)."""
    paths = [Path(p).expanduser() for p in (path if isinstance(path, list | tuple) else [path])]
    for p in paths:
        if not p.exists():
            raise UsageError(f"--data-arg path={str(p)!r} does not exist; check the path")
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        if (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
            return sorted(p for p in folder.rglob("*") if p.is_file()), None
        paths = sorted(p for p in folder.iterdir() if p.suffix in BUILDERS)
        if not paths:
            raise UsageError(
                f"--data-arg path={str(folder)!r} holds no .jsonl/.json/.parquet/.arrow file and "
                "is not a datasets save_to_disk folder: point it at the data files"
            )
    kinds = {BUILDERS.get(p.suffix.lower()) for p in paths}
    if None in kinds or len(kinds) != 1:
        odd = next((p for p in paths if p.suffix.lower() not in BUILDERS), paths[0])
        raise UsageError(
            f"--data-arg path={str(odd)!r} is not a .jsonl, .json, .parquet or .arrow file (one "
            "kind at a time): convert it, or save it with datasets' save_to_disk"
        )
    return sorted(paths), kinds.pop()


def _read(files: list[Path], builder: str | None, path):
    try:
        import datasets
    except ImportError:
        raise UsageError(
            "kdcache.text_dataset needs datasets: pip install 'kdcache[text]'"
        ) from None
    datasets.disable_progress_bars()
    if builder is None:
        ds = datasets.load_from_disk(str(Path(path).expanduser()))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UsageError(
                    f"--data-arg path={str(path)!r} is a DatasetDict without a 'train' split "
                    f"({', '.join(ds)}): save the split you want with save_to_disk"
                )
            ds = ds["train"]
        return ds
    try:  # packaged builders: nothing is downloaded
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", keep_in_memory=True
        )
    except Exception as exc:  # noqa: BLE001 - pyarrow's and datasets' many parse errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(
            f"--data-arg path={str(path)!r} cannot be read as {builder} ({first}): check the file"
        ) from None


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\n{f.stat().st_size}\n".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def split_documents(n: int, split: str, validation_fraction: float, seed: int) -> np.ndarray:
    """The document indices of `split`, in file order: a seeded permutation's first
    round(n * fraction) documents are "validation", the rest "train"."""
    if split not in SPLITS:
        raise UsageError(f"--data-arg split={split!r} is not one of {', '.join(SPLITS)}")
    if not 0 <= validation_fraction < 1:
        raise UsageError(
            f"--data-arg validation_fraction={validation_fraction} is not in [0, 1): give e.g. 0.1"
        )
    if split == "all":
        return np.arange(n)
    held = np.random.default_rng(seed).permutation(n)[: round(n * validation_fraction)]
    in_val = np.zeros(n, bool)
    in_val[held] = True
    return np.flatnonzero(in_val if split == "validation" else ~in_val)


class TextDataset(Dataset):
    """Causal-lm rows of local text or chat files: items are `{"input_ids", "attention_mask"}`
    int64 tensors (chat rows add `labels`).

    `path`: a file, a list of files or a folder of them, or a save_to_disk folder; `tokenizer`: a
    local tokenizer folder; `text_field` / `messages_field`: the column read (messages wins);
    `block_size`: tokens per row (default: the tokenizer's `model_max_length`, at most 1024;
    never more than it, or than `max_length` when given); `packing`: text documents packed into
    full rows (else one per row, truncated); `split`, `validation_fraction`, `seed`: the split by
    document. A conversation left with no assistant token (truncated away) has nothing to learn
    and is dropped (`dropped` counts them)."""

    def __init__(
        self,
        path,
        tokenizer: str,
        text_field: str | None = "text",
        messages_field: str | None = None,
        block_size: int | None = None,
        packing: bool = True,
        split: str = "train",
        validation_fraction: float = 0.0,
        seed: int = 0,
        max_length: int | None = None,
    ) -> None:
        files, builder = _files(path)
        tok = load_tokenizer(tokenizer)
        limit = max_length or getattr(tok, "model_max_length", None)
        limit = limit if limit is not None and limit < 10**9 else None  # HF's "unknown": 1e30
        block_size = block_size or min(limit or DEFAULT_BLOCK, DEFAULT_BLOCK)
        if block_size < 2:
            raise UsageError(f"--data-arg block_size={block_size} is too short: give >= 2 tokens")
        if limit is not None and block_size > limit:
            raise UsageError(
                f"--data-arg block_size={block_size} is over the tokenizer's model_max_length "
                f"{limit}: give block_size <= {limit}"
            )
        table = _read(files, builder, path)
        field = messages_field or text_field
        if field not in table.column_names:
            what = "messages_field" if messages_field else "text_field"
            raise UsageError(
                f"--data-arg {what}={field!r} is not a field of {str(path)!r} (it has "
                f"{', '.join(sorted(table.column_names))}): name the right field"
            )
        docs = split_documents(len(table), split, validation_fraction, seed)
        column = table[field]
        self.documents = len(docs)
        self.rows: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.dropped = 0
        if messages_field:
            for i in docs:
                ids, labels = assistant_labels(tok, column[int(i)], tokenizer, block_size)
                if (labels[1:] != -100).any():  # else nothing to learn: no soft labels to store
                    self.rows.append((ids, labels))
                else:
                    self.dropped += 1
        else:
            self._text(tok, [column[int(i)] for i in docs], block_size, packing)
        self.block_size, self.chat, self.packing = int(block_size), bool(messages_field), packing
        settings = dict(
            builder=builder, field=field, chat=self.chat, block_size=block_size, packing=packing,
            split=split, validation_fraction=validation_fraction, seed=seed,
        )  # fmt: skip
        self.fingerprint = hashlib.sha256(
            json.dumps(
                [_digest(files), tokenizer_digest(tokenizer, tok), settings], sort_keys=True
            ).encode()
        ).hexdigest()
        self.vocab_size = len(tok)

    def _text(self, tok, texts: list, block_size: int, packing: bool) -> None:
        eos = tok.eos_token_id
        if eos is None:
            raise UsageError(
                "the tokenizer has no eos_token, which separates documents: set one "
                "(tokenizer.eos_token = ...) and save it again"
            )
        encoded = tok([t or "" for t in texts], add_special_tokens=True)["input_ids"]
        docs = [np.asarray(list(e) + [eos], np.int64) for e in encoded]
        if not packing:
            self.rows = [(d[:block_size], None) for d in docs]
            return
        flat = np.concatenate(docs) if docs else np.zeros(0, np.int64)
        # The last, shorter block is kept: causal-lm rows may differ in length.
        self.rows = [(flat[a : a + block_size], None) for a in range(0, len(flat), block_size)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        ids, labels = self.rows[i]
        item = {"input_ids": torch.from_numpy(ids.copy())}
        item["attention_mask"] = torch.ones_like(item["input_ids"])
        if labels is not None:
            item["labels"] = torch.from_numpy(labels.copy())
        return item

    def __repr__(self) -> str:
        kind = "chat" if self.chat else ("packed text" if self.packing else "text")
        return (
            f"TextDataset({kind}, rows={len(self)}, documents={self.documents}, "
            f"block_size={self.block_size}, vocab={self.vocab_size})"
        )


def text_dataset(path, tokenizer: str, **kwargs) -> TextDataset:
    """`--data kdcache:text_dataset --data-arg path=FILE --data-arg tokenizer=FOLDER ...`."""
    return TextDataset(path, tokenizer, **kwargs)
