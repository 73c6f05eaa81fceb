"""A causal-lm student's output layer, found so the loss can fuse it (stages/tasks/lm_loss.py).

A student exposes its head either as a Hugging Face causal LM does (`get_output_embeddings()`
returns an `nn.Linear`; its `base_model` gives the last hidden states) or by declaring it: a
`get_output_embeddings()` plus a `hidden_states(input_ids, attention_mask=None)` method that
returns what the head is applied to. The pair is checked once on a probe batch against the
model's own logits, so a model that does more after its head (soft-capping, a logit scale) is
never fused by default, and refused when `--fused-head` is forced.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kdcache.stages.common import data
from kdcache.stages.tasks import causal_lm as lm
from kdcache.storage.errors import UsageError

log = logging.getLogger("kdcache.train")


def unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


class Head:
    """The student's `linear` output layer and `hidden(x)`: the (B, L, H) states it maps."""

    def __init__(self, model: nn.Module, linear: nn.Linear):
        self.model, self.linear = model, linear

    def hidden(self, x: dict) -> torch.Tensor:
        own = getattr(self.model, "hidden_states", None)
        if callable(own):
            return own(x["input_ids"], attention_mask=x["attention_mask"])
        out = data.forward_tokens(self.model.base_model, x)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def find(model: nn.Module) -> Head | None:
    """The student's head, or None when it exposes none (a plain module without the methods)."""
    inner = unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    linear = get() if callable(get) else None
    if not isinstance(linear, nn.Linear):
        return None
    declared = callable(getattr(inner, "hidden_states", None))
    if not declared and getattr(inner, "base_model", inner) is inner:
        return None
    return Head(inner, linear)


def resolve(model: nn.Module, probe_x: dict, vocab: int, wanted: bool | None, spec: str):
    """The head to fuse: `wanted` None fuses where a head is found and checks out, True insists
    (one line naming the problem otherwise), False never fuses."""
    if wanted is False:
        return None
    head = find(model)
    if head is None:
        if wanted:
            raise UsageError(
                f"--fused-head: --student {spec} exposes no output layer (no "
                "get_output_embeddings() returning an nn.Linear, with a base_model or a "
                "hidden_states(input_ids) method): drop --fused-head, or declare the head"
            )
        return None
    width = head.linear.out_features
    if width != vocab:
        raise UsageError(
            f"--fused-head: the output layer of --student {spec} has {width} outputs but the "
            f"vocabulary is {vocab}: give the student a {vocab}-wide head, or pass --no-fused-head"
        )
    model.eval()
    with torch.no_grad():
        want = lm.logits(model, probe_x).float()
        got = head.linear(head.hidden(probe_x)).float()
    if got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        return head
    if wanted:
        raise UsageError(
            f"--fused-head: --student {spec}'s output layer applied to its hidden states does "
            "not give its logits (does the model transform them after the head?): pass "
            "--no-fused-head"
        )
    log.info("the student's head does not give its logits alone: the loss is not fused")
    return None
