"""Causal language models for ``--task causal-lm``: map ``input_ids (B, L)`` to logits ``(B, L, V)``.

- ``gpt2(...)``: a Hugging Face ``GPT2LMHeadModel`` built from a config, randomly initialised
  with a seed (nothing is downloaded). Dropout defaults to 0 (small models, KD runs that should
  repeat); pass ``resid_pdrop=0.1`` etc. to change it.
- ``from_folder(path)``: any causal LM saved with ``save_pretrained`` in a local folder.
- ``TinyCausalLM``: a plain ``nn.Module`` (embedding, one causal convolution, head) whose forward
  takes ``input_ids`` only, for fast tests.

``transformers`` is the ``lm`` extra; it is imported only when a factory is called.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from kdcache.storage.errors import UsageError


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError(
            "the language-model examples need transformers: pip install 'kdcache[lm]'"
        ) from None
    return transformers


def gpt2(
    vocab_size: int = 4096,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    n_positions: int = 256,
    seed: int = 0,
    **config,
) -> nn.Module:
    """A randomly initialised GPT-2 (``seed`` fixes the weights); ``config`` sets any other
    ``GPT2Config`` field."""
    tf = _transformers()
    # Token 0 is <|endoftext|> in kdcache.pipeline.examples.text; no cache is needed for the
    # single full-sequence forwards kdcache makes.
    settings = {
        # GPT-2's tanh GELU as PyTorch's one fused kernel, not transformers' `gelu_new` (five
        # elementwise ops in Python): the same function (logits within 1e-5), and on 1 CPU
        # thread the job's teacher forward is 27% faster, a student step 20%.
        "activation_function": "gelu_pytorch_tanh",
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": False,
    }
    settings.update(config)
    cfg = tf.GPT2Config(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        **settings,
    )
    # A private generator state: building a model must not move the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tf.GPT2LMHeadModel(cfg)


def from_folder(path: str | os.PathLike) -> nn.Module:
    """Any causal LM saved with ``save_pretrained`` in a local folder; never the hub."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise UsageError(
            f"--teacher-arg path={str(path)!r} is not a saved model folder (no config.json): "
            "give a folder written by save_pretrained"
        )
    tf = _transformers()
    return tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)


class TinyCausalLM(nn.Module):
    """Embedding, a causal depthwise convolution (each position sees itself and the previous
    ``width - 1``), a pointwise MLP and a head: logits ``(B, L, V)``."""

    def __init__(self, vocab_size: int = 256, dim: int = 32, seed: int = 0, width: int = 4):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab_size, dim)
            self.conv = nn.Conv1d(dim, dim, width, groups=dim)
            self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
            self.head = nn.Linear(dim, vocab_size)
        self.width = width

    def hidden_states(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """The states the head maps to logits (declared with `get_output_embeddings`, so stage
        two can fuse the head into its loss)."""
        h = self.embed(input_ids).transpose(1, 2)
        # Left padding only: position t never sees t + 1, so right padding changes nothing.
        h = self.conv(nn.functional.pad(h, (self.width - 1, 0))).transpose(1, 2)
        return h + self.mlp(h)

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_states(input_ids))
