"""Tiny offline inputs for `kdcache.text_dataset` tests: a byte-level BPE tokenizer trained here
(saved with a chat template), and JSONL files of documents and of chats."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "dog",
    "ran",
    "far",
    "from",
    "home",
    "while",
    "birds",
    "sang",
    "in",
    "tall",
    "green",
    "trees",
]


def documents(n: int = 24) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(5 + i % 7)) for i in range(n)]


def chats(n: int = 12) -> list[list[dict]]:
    out = []
    for i, doc in enumerate(documents(n)):
        turns = [{"role": "user", "content": f"say {doc[:12]}"}]
        turns.append({"role": "assistant", "content": doc})
        if i % 2:
            turns += [{"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
        out.append(turns)
    return out


def tokenizer(folder: Path, chat_template: bool = True, max_length: int = 128) -> Path:
    """A 320-id byte-level BPE tokenizer in `folder` (save_pretrained's files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", model_max_length=max_length
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def inputs(tmp: Path) -> dict[str, Path]:
    """tokenizer/, docs.jsonl ({"text"}) and chats.jsonl ({"messages"}) under `tmp`."""
    return {
        "tokenizer": tokenizer(tmp / "tokenizer"),
        "docs": jsonl(
            tmp / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(documents())]
        ),
        "chats": jsonl(tmp / "chats.jsonl", [{"messages": c} for c in chats()]),
    }
