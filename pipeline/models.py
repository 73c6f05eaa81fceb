"""Building a teacher (or student) from a spec, a checkpoint, or both, and naming its identity."""

from __future__ import annotations

import hashlib
import io
import zipfile

import fsspec
import torch

from kdcache.pipeline.fingerprint import params_hash
from kdcache.pipeline.specs import build
from kdcache.storage.errors import UsageError


def _read_checkpoint(url: str, storage_options: dict | None, flag: str = "--checkpoint") -> bytes:
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"{flag} {url!r} does not exist; check the path") from None


def _unreadable(flag: str, url: str, exc: Exception) -> UsageError:
    """One line for a file torch cannot load (its own messages run to a dozen lines)."""
    text = str(exc)
    if "Unsupported global" in text:
        why = (
            "it holds pickled Python objects (a whole model saved with torch.save(model)?), "
            "which kdcache does not unpickle: save model.state_dict(), TorchScript or torch.export"
        )
    else:
        why = (
            f"it is not a state dict, TorchScript or torch.export file ({type(exc).__name__}): "
            "pass the file `torch.save(model.state_dict(), path)` wrote"
        )
    return UsageError(f"{flag} {url!r} cannot be loaded: {why}")


def _archive_kind(data: bytes) -> str:
    """'script' (TorchScript), 'export' (torch.export .pt2) or 'state' (a pickled state dict)."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return "state"
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "script"
    if any("serialized_exported_program" in n or n.endswith("models/model.json") for n in names):
        return "export"
    return "state"


def _state_dict(obj) -> dict:
    # Accept trainer checkpoints too ({"model": state_dict, ...}), not only bare state dicts.
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    if isinstance(obj, dict):
        return obj
    raise UsageError(f"it holds a {type(obj).__name__}, not a state dict")


def random_init(spec: str, kwargs: dict, model: torch.nn.Module, what: str = "--teacher") -> bool:
    """True when `spec` takes its weights from torch's random generator: built once more under
    another seed it gives other weights. A factory that loads trained weights, or seeds itself,
    builds the same weights every time. The global generator is left as it was. A seeded
    factory of fresh weights (`kdcache.hf_causal_lm` from a config) says so itself."""
    if getattr(model, "kdcache_random_init", False):
        return True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() ^ 0x5EED)
        other = build(spec, kwargs, what=what)
    return params_hash(other) != params_hash(model)


def load_model(
    spec: str | None,
    kwargs: dict,
    checkpoint: str | None = None,
    storage_options: dict | None = None,
    what: str = "--teacher",
    flag: str = "--checkpoint",
) -> tuple[torch.nn.Module, dict]:
    """The model in eval mode plus its identity: spec, kwargs and a hash of its weights.

    `what` and `flag` are the options that gave the spec and the checkpoint, for messages.
    """
    identity = {"spec": spec, "kwargs": kwargs, "checkpoint": checkpoint}
    if checkpoint is None:
        if spec is None:
            raise UsageError(f"{what} SPEC or {flag} FILE is required")
        model = build(spec, kwargs, what=what)
        identity["weights_sha256"] = None
    else:
        data = _read_checkpoint(checkpoint, storage_options, flag)
        identity["weights_sha256"] = hashlib.sha256(data).hexdigest()
        kind = _archive_kind(data)
        if kind == "state" and spec is None:
            raise UsageError(f"{flag} {checkpoint!r} is a state dict: {what} SPEC is needed too")
        try:
            if kind == "script":
                model = torch.jit.load(io.BytesIO(data), map_location="cpu")
            elif kind == "export":
                model = torch.export.load(io.BytesIO(data)).module()
            else:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - whatever torch raises, the file is unusable
            raise _unreadable(flag, checkpoint, exc) from None
        if kind == "state":
            model = build(spec, kwargs, what=what)
            try:
                model.load_state_dict(_state_dict(state))
            except (RuntimeError, KeyError, ValueError, UsageError) as exc:
                why = _mismatch(model, state) or str(exc).strip().splitlines()[0]
                raise UsageError(
                    f"{flag} {checkpoint!r} does not fit {what} {spec!r}: {why}; build the model "
                    "with the arguments it was trained with (or pass that model's checkpoint)"
                ) from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            f"{what} {spec!r} built a {type(model).__name__}, not a torch.nn.Module: name a "
            "module class or a factory that returns one"
        )
    if identity["weights_sha256"] is None:
        # No file to hash: the weights themselves (e.g. a seeded factory) are the identity.
        identity["params_sha256"] = params_hash(model)
    return model.eval(), identity


def _mismatch(model: torch.nn.Module, state) -> str:
    """torch's message is one line per key; the first few differences, on one line."""
    try:
        got = {k: tuple(v.shape) for k, v in _state_dict(state).items()}
    except Exception:  # noqa: BLE001 - not a mapping of tensors: torch's own message says so
        return ""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    parts = []
    for label, keys in (("missing", want.keys() - got.keys()), ("unexpected", got.keys() - want)):
        if keys:
            shown = ", ".join(sorted(keys)[:3]) + (", ..." if len(keys) > 3 else "")
            parts.append(f"{len(keys)} {label} key(s) ({shown})")
    shapes = [k for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
    if shapes:
        k = shapes[0]
        more = f" and {len(shapes) - 1} more" if len(shapes) > 1 else ""
        parts.append(
            f"{k} has shape {list(got[k])} in the file, {list(want[k])} in the model{more}"
        )
    return "; ".join(parts)


def saved_settings(url: str, storage_options: dict | None = None) -> dict:
    """The run settings a trainer's checkpoint-N.pt records ({} for any other weights file)."""
    data = _read_checkpoint(url, storage_options)
    if _archive_kind(data) != "state":
        return {}
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a checkpoint we can read: load_model says why
        return {}
    settings = obj.get("settings") if isinstance(obj, dict) else None
    return settings if isinstance(settings, dict) else {}
