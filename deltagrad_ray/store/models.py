"""Model files: safetensors with the model spec in the metadata (never pickles)."""

from __future__ import annotations

import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..core.errors import InputError
from ..core.models import FunctionalModel, ModelSpec
from .location import Location, StorageError, location

MODEL_FORMAT = "deltagrad-ray-model/1"


def model_bytes(model: FunctionalModel, theta: torch.Tensor, metadata: dict | None = None) -> bytes:
    if model.spec is None:
        raise InputError("only built-in models (logreg, linear, mlp) can be saved with their spec")
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.unflatten(theta).items()}
    meta = {"format": MODEL_FORMAT, "spec": json.dumps(model.spec.to_dict()),
            "extra": json.dumps(metadata or {}, sort_keys=True)}
    return st_save(tensors, metadata=meta)


def save_model(uri: str | Location, model: FunctionalModel, theta: torch.Tensor, *,
               metadata: dict | None = None, overwrite: bool = False) -> Location:
    """Save θ as safetensors: one tensor per named parameter (``weight`` (c × d) and ``bias``
    (c) for logreg/linear), the spec and ``metadata`` as JSON in the header."""
    loc = location(uri)
    loc.write_bytes(model_bytes(model, theta, metadata), overwrite=overwrite)
    return loc


def parse_model(raw: bytes, uri: str) -> tuple[FunctionalModel, torch.Tensor, dict]:
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise InputError(f"{uri}: not a safetensors model file ({e})") from None
    meta = header.get("__metadata__", {})
    if meta.get("format") != MODEL_FORMAT:
        raise InputError(f"{uri}: not a deltagrad-ray model (format {meta.get('format')!r}, "
                         f"expected {MODEL_FORMAT!r})")
    model = ModelSpec.from_dict(json.loads(meta["spec"])).build()
    theta = model.flatten(tensors)
    return model, theta, json.loads(meta.get("extra", "{}"))


def load_model(uri: str | Location) -> tuple[FunctionalModel, torch.Tensor, dict]:
    """(model, θ, metadata) from a model file written by :func:`save_model`."""
    loc = location(uri)
    if not loc.exists():
        raise StorageError(f"{loc.uri}: not found")
    return parse_model(loc.read_bytes(), loc.uri)
