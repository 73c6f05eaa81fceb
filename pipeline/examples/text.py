"""A real text corpus that ships offline, its BPE tokenizer, and fixed-length token blocks.

The corpus is the Python source of the installed ``torch`` package (pinned to 2.13.0 by the
Makefile): real, human-written text of about 46 MB that every kdcache venv already holds, so
nothing is downloaded. Files are sorted by their path (``torch/...``); ``torch/version.py`` is
left out because it records the build (CUDA version, git hash), not source. The corpus is
checksummed; another torch version is refused unless ``check=False``.

Splits are by file: a stable hash of the path sends one file in ``VALIDATION_ONE_IN`` to
``"validation"``, the rest to ``"train"``, so no text is in both.

A byte-level BPE tokenizer (``tokenizers``) is trained on the train split only, and each split
is tokenized once: ``tokenizer.json`` and ``<split>.npy`` are cached in a folder keyed by the
corpus checksum and the tokenizer's settings. Each file's tokens end with ``<|endoftext|>``
(id 0). ``TextBlocks`` cuts a split's tokens into consecutive blocks of ``block`` tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.pipeline.examples.mnist1d import atomic_write, default_cache_dir
from kdcache.storage.errors import UsageError

TORCH_PIN = "2.13.0"
CORPUS_SHA256 = "2add5145cbe8a81f7e780296cdf9a658ae33ce7c46b99cbf0b8cf9cb332912d9"
CORPUS_BYTES = 46_444_776
SPLITS = ("train", "validation")
VALIDATION_ONE_IN = 20
EOS = "<|endoftext|>"
# Bumped whenever the cached files change meaning, so stale ones are never misread.
_CACHE_FORMAT = 1
# Files tokenized per call while only a `max_tokens` prefix is wanted.
_CHUNK_FILES = 32


def split_of(path: str) -> str:
    """The split of a corpus file, from a stable hash of its relative path."""
    h = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big")
    return "validation" if h % VALIDATION_ONE_IN == 0 else "train"


def checksum(files: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for path, data in files:
        h.update(f"{path}\n{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


class Corpus(NamedTuple):
    files: tuple[tuple[str, str], ...]  # (relative path, text), sorted by path
    sha256: str
    nbytes: int


@functools.cache
def corpus(check: bool = True) -> Corpus:
    """The installed torch's Python sources, checked against the pin unless `check` is off."""
    root = Path(torch.__file__).parent
    paths = sorted((p.relative_to(root.parent).as_posix(), p) for p in root.rglob("*.py"))
    files = [(rel, p.read_bytes()) for rel, p in paths if rel != "torch/version.py"]
    if check and torch.__version__.split("+")[0] != TORCH_PIN:
        raise UsageError(
            f"the text corpus is pinned to torch {TORCH_PIN}'s sources, but torch "
            f"{torch.__version__} is installed: install torch=={TORCH_PIN}, or pass "
            "--data-arg check=false to use this torch's sources unpinned"
        )
    digest, size = checksum(files), sum(len(d) for _, d in files)
    if check and (digest, size) != (CORPUS_SHA256, CORPUS_BYTES):
        raise UsageError(
            f"torch {torch.__version__}'s sources hash to {digest[:12]} ({size} bytes), not "
            f"the pinned {CORPUS_SHA256[:12]} ({CORPUS_BYTES} bytes): reinstall "
            f"torch=={TORCH_PIN}, or pass --data-arg check=false to use them unpinned"
        )
    return Corpus(tuple((rel, data.decode("utf-8")) for rel, data in files), digest, size)


def split_texts(split: str, check: bool = True) -> list[str]:
    return [text for rel, text in corpus(check).files if split_of(rel) == split]


def _prefix(texts: list[str], max_bytes: int | None) -> list[str]:
    """The texts' first `max_bytes` bytes (the last text cut at a character boundary)."""
    if max_bytes is None:
        return texts
    out, left = [], int(max_bytes)
    for text in texts:
        if left <= 0:
            break
        data = text.encode()[:left]
        out.append(data.decode("utf-8", errors="ignore"))
        left -= len(data)
    return out


def cache_folder(vocab: int, max_bytes: int | None, check: bool = True, cache_dir=None) -> Path:
    """Where the tokenizer and token arrays of these settings live."""
    key = {
        "corpus": corpus(check).sha256,
        "vocab": int(vocab),
        "max_bytes": max_bytes,
        "tokenizers": metadata.version("tokenizers"),
        "format": _CACHE_FORMAT,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return default_cache_dir(cache_dir, "text") / f"torch-py-v{vocab}-{digest}"


def load_tokenizer(folder: Path, vocab: int, max_bytes: int | None, check: bool = True):
    """The byte-level BPE tokenizer of the train split, trained once into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = folder / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab < len(alphabet) + 1:
        raise UsageError(
            f"--data-arg vocab={vocab} is too small: byte-level BPE needs at least "
            f"{len(alphabet) + 1} (256 bytes and {EOS})"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOS], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_prefix(split_texts("train", check), max_bytes), trainer=trainer)
    atomic_write(path, lambda f: f.write(tok.to_str(pretty=True).encode()))
    return tok


def encode(tok, texts: list[str]) -> np.ndarray:
    """The texts' token ids, each text followed by EOS, concatenated (uint16 when they fit)."""
    eos = tok.token_to_id(EOS)
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.int32
    parts = [np.asarray(e.ids + [eos], dtype) for e in tok.encode_batch_fast(texts)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def load_tokens(
    split: str, folder: Path, tok, max_tokens: int | None, check: bool = True
) -> np.ndarray:
    """The split's tokens, encoded once into `folder` (only a prefix when `max_tokens` is set
    and the whole split is not cached yet: per-file encoding makes it the whole's prefix)."""
    full = folder / f"{split}.npy"
    if full.exists():
        return np.load(full, mmap_mode="r")[:max_tokens]
    texts = split_texts(split, check)
    if max_tokens is None:
        tokens = encode(tok, texts)
        atomic_write(full, lambda f: np.save(f, tokens))
        return tokens
    part = folder / f"{split}-first{max_tokens}.npy"
    if part.exists():
        return np.load(part, mmap_mode="r")
    chunks, n = [], 0
    for a in range(0, len(texts), _CHUNK_FILES):
        if n >= max_tokens:
            break
        chunks.append(encode(tok, texts[a : a + _CHUNK_FILES]))
        n += len(chunks[-1])
    tokens = np.concatenate(chunks)[:max_tokens]
    atomic_write(part, lambda f: np.save(f, tokens))
    return tokens


class TextBlocks(Dataset):
    """Consecutive, non-overlapping blocks of ``block`` tokens of one split (a last partial
    block is dropped); items are int64 ``(block,)`` tensors.

    ``vocab`` sizes the tokenizer; ``max_bytes`` trains it on a prefix of the train split (toy
    sizes, tests); ``max_tokens`` keeps only the split's first tokens (small runs).
    """

    def __init__(
        self,
        split: str = "train",
        block: int = 128,
        vocab: int = 4096,
        max_tokens: int | None = None,
        max_bytes: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        check: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise UsageError(f"--data-arg split={split!r} is not one of {', '.join(SPLITS)}")
        if block < 2:
            raise UsageError(f"--data-arg block={block} is too short: a block needs >= 2 tokens")
        self.split, self.block = split, int(block)
        self.folder = cache_folder(vocab, max_bytes, check, cache_dir)
        self.tokenizer = load_tokenizer(self.folder, vocab, max_bytes, check)
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.tokens = load_tokens(split, self.folder, self.tokenizer, max_tokens, check)
        n = len(self.tokens) // self.block
        self._blocks = self.tokens[: n * self.block].reshape(n, self.block)

    def __len__(self) -> int:
        return len(self._blocks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._blocks[i].astype(np.int64))

    def get_batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Vectorised ``__getitem__``: ``input_ids`` and an all-ones ``attention_mask``, int64
        ``(n, block)``."""
        x = self._blocks[np.asarray(ids, dtype=np.int64)].astype(np.int64)
        return {"input_ids": x, "attention_mask": np.ones_like(x)}

    def __repr__(self) -> str:
        return (
            f"TextBlocks(split={self.split!r}, blocks={len(self)}, block={self.block}, "
            f"vocab={self.vocab_size}, tokens={len(self.tokens)})"
        )
