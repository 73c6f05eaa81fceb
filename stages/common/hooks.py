"""What a forward gives: its logits (`logits_of`), and a named submodule's output pooled to one
vector per sample (`FeatureTap`)."""

from __future__ import annotations

import difflib

import torch

from kdcache.storage.errors import UsageError

POOLS = ("avg", "token-mean", "cls", "last", "flatten")


def pool(t: torch.Tensor, mode: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """avg: mean over every dim after 1 (conv N,C,...); token-mean: mean over dim 1 (N,T,D);
    cls: index 0 of dim 1; last: the last token; flatten: everything after the batch dim.

    With an attention `mask` (N, T) (token inputs), token-mean and last see real tokens only, so
    a block's features do not depend on how much padding its batch needed."""
    tokens = t.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(t.shape[:2])
    if mode == "avg":
        return t.flatten(2).mean(-1) if t.dim() > 2 else t
    if mode == "token-mean":
        if tokens:
            m = mask.to(t.dtype).unsqueeze(-1)
            return (t * m).sum(1) / m.sum(1).clamp_min(1)
        return t.mean(1) if t.dim() > 2 else t
    if mode == "cls":
        return t[:, 0] if t.dim() > 2 else t
    if mode == "last":
        if tokens:
            last = (mask.long().sum(1) - 1).clamp_min(0)
            return t[torch.arange(len(t), device=t.device), last.to(t.device)]
        return t[:, -1] if t.dim() > 2 else t
    if mode == "flatten":
        return t.flatten(1)
    raise UsageError(f"--pool {mode!r} is not one of {', '.join(POOLS)}")


def find_module(model: torch.nn.Module, name: str, option: str = "--features") -> torch.nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        names = [n for n in modules if n]
        close = difflib.get_close_matches(name, names, n=3)
        # No near miss: name a few real ones, so the fix is on the same line as the error.
        hint = (
            f"; did you mean {', '.join(close)}?"
            if close
            else f"; choose one of its named_modules(): {', '.join(names[:6])}"
            + (", ..." if len(names) > 6 else "")
        )
        raise UsageError(f"{option} {name!r} is not a submodule of {type(model).__name__}{hint}")
    return modules[name]


class FeatureTap:
    """Context manager: while active, `.value` holds the pooled output of the last forward."""

    def __init__(self, model: torch.nn.Module, name: str, mode: str, option: str = "--features"):
        if mode not in POOLS:
            raise UsageError(f"--pool {mode!r} is not one of {', '.join(POOLS)}")
        self.module = find_module(model, name, option)
        self.mode = mode
        self.name = name
        self.value: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # the batch's attention mask, for token inputs
        self._handle = None

    def _hook(self, module, inputs, output) -> None:
        if isinstance(output, tuple | list):
            output = output[0]
        if not isinstance(output, torch.Tensor) or output.dim() < 2:
            raise UsageError(
                f"feature layer {self.name!r} returned {type(output).__name__}"
                f"{getattr(output, 'shape', '')}: it needs a (batch, ...) tensor"
            )
        self.value = pool(output, self.mode, self.mask)

    def __enter__(self) -> FeatureTap:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()


def logits_of(output) -> torch.Tensor:
    """The logits in a forward's output: a tensor, `out["logits"]`, `out.logits`, or `out[0]`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UsageError(
        f"the model returned {type(output).__name__}; it must return logits (B, C), a dict with "
        "'logits', an object with .logits, or a tuple whose first item is the logits"
    )
