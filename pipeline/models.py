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


def _read_checkpoint(url: str, storage_options: dict | None) -> bytes:
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"--checkpoint {url!r} does not exist") from None


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
    raise UsageError(f"checkpoint holds a {type(obj).__name__}, not a state dict")


def load_model(
    spec: str | None,
    kwargs: dict,
    checkpoint: str | None = None,
    storage_options: dict | None = None,
    what: str = "--teacher",
) -> tuple[torch.nn.Module, dict]:
    """The model in eval mode plus its identity: spec, kwargs and a hash of its weights."""
    identity = {"spec": spec, "kwargs": kwargs, "checkpoint": checkpoint}
    if checkpoint is None:
        if spec is None:
            raise UsageError(f"{what} SPEC or --checkpoint FILE is required")
        model = build(spec, kwargs, what=what)
        identity["weights_sha256"] = None
    else:
        data = _read_checkpoint(checkpoint, storage_options)
        identity["weights_sha256"] = hashlib.sha256(data).hexdigest()
        kind = _archive_kind(data)
        if kind == "script":
            model = torch.jit.load(io.BytesIO(data), map_location="cpu")
        elif kind == "export":
            model = torch.export.load(io.BytesIO(data)).module()
        else:
            if spec is None:
                raise UsageError(
                    f"--checkpoint {checkpoint!r} is a state dict: {what} SPEC is needed too"
                )
            model = build(spec, kwargs, what=what)
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                model.load_state_dict(_state_dict(state))
            except (RuntimeError, KeyError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0]
                raise UsageError(
                    f"--checkpoint {checkpoint!r} does not fit {what} {spec!r}: {first}"
                ) from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{what} {spec!r} built a {type(model).__name__}, not a torch.nn.Module")
    if identity["weights_sha256"] is None:
        # No file to hash: the weights themselves (e.g. a seeded factory) are the identity.
        identity["params_sha256"] = params_hash(model)
    return model.eval(), identity


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
