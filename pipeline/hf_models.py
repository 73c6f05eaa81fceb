"""`kdcache.hf_causal_lm`: any Hugging Face causal LM as a teacher or student, without code.

- `path=FOLDER`: the model `save_pretrained` wrote (trained weights; never the hub).
- `config=FILE_OR_FOLDER` plus any config field as another argument (`num_hidden_layers=2`,
  `hidden_size=256`, ...): a fresh model of that architecture. Its weights come from torch's
  generator, which `kdcache train` seeds with `--seed` right before building the student, so a
  rerun builds the same ones and `--seed` varies them; `seed=N` pins them whatever the caller's
  generator (and leaves it as it was). Such a model declares its weights random
  (`kdcache_random_init`): as a teacher it is refused without `--checkpoint` or
  `--random-teacher`.

Position limits: `check_positions` refuses a data set whose `block_size` is over the model's
position table (its config's `max_position_embeddings` / `n_positions`), before a forward fails
on it with an index error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdcache.storage.errors import UsageError


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError(
            "kdcache.hf_causal_lm needs transformers: pip install 'kdcache[lm]'"
        ) from None
    return transformers


def _config_file(config: str) -> Path:
    p = Path(config).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UsageError(
            f"--student-arg config={config!r} is not a config.json (or a folder with one): give "
            "the file save_pretrained wrote"
        )
    return p


def hf_causal_lm(
    path: str | None = None, config: str | None = None, seed: int | None = None,
    dtype: str | None = None,
    **overrides,
) -> torch.nn.Module:  # fmt: skip
    """A causal LM from a saved folder (`path`) or a config plus overrides (`config`); `dtype`
    (e.g. "bfloat16") sets the weights' type."""
    tf = _transformers()
    if (path is None) == (config is None):
        raise UsageError(
            "kdcache:hf_causal_lm takes path=FOLDER (a saved model) or config=config.json (a new "
            "one, plus overrides such as num_hidden_layers=2), exactly one of them"
        )
    torch_dtype = getattr(torch, dtype) if dtype else None
    if path is not None:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"--teacher-arg path={path!r} is not a saved model folder (no config.json): give "
                "a folder written by save_pretrained, or config= to build a new model"
            )
        if overrides:
            raise UsageError(
                f"kdcache:hf_causal_lm path={path!r} loads trained weights, so {sorted(overrides)}"
                " cannot change its architecture: use config= to build a new model"
            )
        return tf.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch_dtype
        )
    file = _config_file(config)
    try:
        settings = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"--student-arg config={config!r} is not valid JSON: {exc}") from None
    kind = settings.pop("model_type", None)
    if kind is None:
        raise UsageError(f"--student-arg config={config!r} has no model_type: not an HF config")
    try:
        cfg = tf.AutoConfig.for_model(kind, **(settings | overrides))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--student-arg config={config!r} with {overrides}: {exc}") from None
    if seed is None:
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    else:  # a private generator state: a pinned seed leaves the caller's stream where it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    model.kdcache_random_init = True
    return model


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len")


def check_positions(model, ds, what: str = "--teacher") -> None:
    """Refuse rows longer than the model can take, where both are known."""
    size, config = getattr(ds, "block_size", None), getattr(model, "config", None)
    for name in POSITION_FIELDS:
        limit = getattr(config, name, None)
        if isinstance(limit, int) and isinstance(size, int) and size > limit:
            raise UsageError(
                f"--data-arg block_size={size} is over {what}'s maximum of {limit} positions "
                f"({name} in its config): give block_size <= {limit}"
            )
