"""A local HF tokenizer for `kdcache.text_dataset`: loading it, its identity, and chat rows whose
only learned tokens are the assistant's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from kdcache.storage.errors import UsageError

# The files a tokenizer is read from (a model folder's weights are not hashed: they do not
# change the tokens).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def load_tokenizer(path: str):
    """`AutoTokenizer` from a local folder, never the hub."""
    folder = Path(path).expanduser()
    if not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES[:8]):
        raise UsageError(
            f"--data-arg tokenizer={str(path)!r} is not a tokenizer folder (no tokenizer.json, "
            "tokenizer_config.json or vocabulary): give the folder tokenizer.save_pretrained wrote"
        )
    try:
        import transformers
    except ImportError:
        raise UsageError(
            "kdcache.text_dataset needs transformers: pip install 'kdcache[lm]'"
        ) from None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(
            f"--data-arg tokenizer={str(path)!r} cannot be loaded ({first}): give the folder "
            "tokenizer.save_pretrained wrote"
        ) from None


def tokenizer_digest(path: str, tok) -> str:
    """The tokenizer's files' bytes, plus its chat template (which may be set in code)."""
    h = hashlib.sha256()
    folder = Path(path).expanduser()
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            h.update(f"{name}\n".encode())
            h.update((folder / name).read_bytes())
    h.update(str(getattr(tok, "chat_template", None)).encode())
    return h.hexdigest()


def _render(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def assistant_labels(tok, messages, path: str, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One conversation's token ids (truncated to `block_size`) and HF-style labels: the id on
    the assistant's tokens, -100 elsewhere.

    Each assistant turn is located in the rendered text, as the characters between the prompt
    rendered up to it (with the generation prompt) and the conversation rendered through it, and
    a token is the assistant's when it starts there (offsets of the fast tokenizer): no reliance
    on `{% generation %}` tags, which few templates have."""
    if not getattr(tok, "chat_template", None):
        raise UsageError(
            f"--data-arg tokenizer={str(path)!r} has no chat template, which chat data "
            "(messages_field) needs: save the tokenizer with one (tokenizer.chat_template = ...)"
        )
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m for m in messages
    ):
        raise UsageError(
            f"--data-arg messages_field holds {type(messages).__name__}, not a list of "
            "{'role', 'content'} messages: name the field with the conversations"
        )
    full = _render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tok, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(_render(tok, messages[: i + 1]))
        if not full.startswith(_render(tok, messages[: i + 1])):
            raise UsageError(
                f"the chat template of --data-arg tokenizer={str(path)!r} renders a "
                "conversation's start differently from the whole: the assistant's tokens cannot "
                "be found; use a template that only appends turns"
            )
        spans.append((start, end))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int64)[:block_size]
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], np.int64)[:block_size]
    learned = np.zeros(len(ids), bool)
    for a, b in spans:
        learned |= (starts >= a) & (starts < b)
    return ids, np.where(learned, ids, -100)
