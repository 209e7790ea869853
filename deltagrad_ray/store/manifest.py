"""The cache manifest as a typed value, read and written only here.

``manifest.json`` is the commit record of a trajectory cache. :class:`Manifest` is its typed form:
other layers read its attributes, never the JSON. It has two parts:

* :class:`Training` — everything that defines the recorded run (model, optimiser, learning-rate
  schedule, λ, batch plan, steps, dtype). Exact retraining and the replay both take their
  schedule from it, so they cannot disagree. Its digest is also written into every shard's
  Parquet footer: a manifest edited after the fact (say, a learning rate or λ) no longer matches
  its shards and the cache is refused, where it would otherwise silently retrain a different run.
* the rest: the data the run saw, the rows earlier changes removed or added, the shards and
  files with their sizes and sha256, the change log.

The JSON layout is that of format version 1 plus ``training_digest``; version-1 caches (no digest
in their shards) are still read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from ..core.config import DTYPES as _TRAINING_DTYPES
from ..core.errors import InputError
from ..core.models import ModelSpec
from ..core.schedule import BatchPlan, learning_rates
from .location import StorageError

FORMAT = "deltagrad-ray-cache"
FORMAT_VERSION = 2
DIGEST_KEY = b"deltagrad_ray.training_digest"  # in every shard's Parquet key-value metadata
OPTIMIZERS = ("gd", "sgd")
DTYPES = tuple(_TRAINING_DTYPES)


@dataclass(frozen=True)
class Training:
    """What defines a recorded run: retraining it exactly, or replaying it, needs nothing else.

    Fields:
      model:      the built-in model
      optimizer:  ``gd`` or ``sgd``
      lr, milestones, gamma: the learning-rate schedule (:func:`~deltagrad_ray.core.schedule.learning_rates`)
      l2:         λ of (λ/2)‖θ‖²
      seed:       initialisation and batch order
      plan:       the batch plan (n_base, batch_size, seed)
      steps:      T
      dtype:      training dtype name (``float64`` / ``float32``)
    """

    model: ModelSpec
    optimizer: str
    lr: float
    milestones: tuple[int, ...]
    gamma: float
    l2: float
    seed: int
    plan: BatchPlan
    steps: int
    dtype: str

    def learning_rates(self) -> torch.Tensor:
        """(T,) float64 η_t: the one schedule exact retraining and the replay both use."""
        return learning_rates(self.steps, self.lr, self.milestones, self.gamma)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "optimizer": self.optimizer, "lr": self.lr,
                "milestones": list(self.milestones), "gamma": self.gamma, "l2": self.l2, "seed": self.seed,
                "plan": self.plan.to_dict(), "steps": self.steps, "dtype": self.dtype}

    def digest(self) -> str:
        """sha256 of the canonical JSON of these settings."""
        return "sha256:" + hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class DataRef:
    """The data set a run was trained on (features, labels, ids), as recorded."""

    uri: str
    fingerprint: str
    n: int
    d: int
    dtype: str


@dataclass(frozen=True)
class ParentRef:
    """The cache a derived cache was replayed (or retrained) from."""

    uri: str
    run_id: str


@dataclass(frozen=True)
class FileRef:
    """A file of the cache other than the shards (model files, removed/added rows)."""

    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardRef:
    """One shard: steps [start, stop) of the per-step vectors."""

    path: str     # relative to the cache root
    start: int    # first step
    stop: int     # one past the last step
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"path": self.path, "start": self.start, "stop": self.stop, "bytes": self.bytes,
                "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    """A committed cache's manifest.

    Fields:
      training:        the run's settings (:class:`Training`)
      data:            the data set it was trained on
      n_rows:          rows the trajectory covers (the data's, plus rows added by earlier changes)
      parent:          the cache this one was derived from, if any
      changes:         the change log (one entry per change that led here: counts, settings, diagnostics)
      run_id, created: who wrote it, and when
      shard_steps, row_group_steps: the shard layout
      storage_dtype:   precision of the stored vectors
      shards, files:   what the cache holds, with sizes and sha256
      format_version:  of the manifest that was read
    """

    training: Training
    data: DataRef
    n_rows: int
    parent: ParentRef | None
    changes: tuple[dict, ...]
    run_id: str
    created: str
    shard_steps: int
    row_group_steps: int | None
    storage_dtype: str
    shards: tuple[ShardRef, ...]
    files: dict[str, FileRef] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # -- short names for what every reader asks -------------------------------------------------
    @property
    def steps(self) -> int:
        return self.training.steps

    @property
    def model(self) -> ModelSpec:
        return self.training.model

    @property
    def shard_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def model_sha256(self) -> str:
        """sha256 of the trained model file (θ_T)."""
        return self.files["model.safetensors"].sha256

    # -- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        t = self.training
        p = t.model.build()
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model": t.model.to_dict(),
            "params": {"names": list(p.names), "shapes": [list(s) for s in p.shapes], "p": p.p},
            "optimizer": {"kind": t.optimizer, "batch_size": t.plan.batch_size, "l2": t.l2,
                          "lr": {"base": t.lr, "milestones": list(t.milestones), "gamma": t.gamma}},
            "l2": t.l2, "seed": t.seed, "plan": t.plan.to_dict(), "steps": t.steps, "dtype": t.dtype,
            "training_digest": t.digest(),
            "n_rows": self.n_rows,
            "data": {"uri": self.data.uri, "fingerprint": self.data.fingerprint, "n": self.data.n,
                     "d": self.data.d, "dtype": self.data.dtype},
            "parent": None if self.parent is None else {"uri": self.parent.uri, "run_id": self.parent.run_id},
            "changes": [dict(c) for c in self.changes],
            "run_id": self.run_id, "created": self.created, "shard_steps": self.shard_steps,
            "row_group_steps": self.row_group_steps, "storage_dtype": self.storage_dtype,
            "shards": [s.to_dict() for s in self.shards],
            "files": {k: {"bytes": f.bytes, "sha256": f.sha256} for k, f in self.files.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, uri: str = "manifest.json") -> Manifest:
        """Parse and check a manifest; a missing or mistyped field is a :class:`StorageError` naming it."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise StorageError(f"{uri}: not a deltagrad-ray cache manifest (format "
                               f"{d.get('format') if isinstance(d, dict) else None!r})")
        version = d.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
            raise StorageError(f"{uri}: cache format version {version!r} is newer than this deltagrad-ray "
                               f"reads (<= {FORMAT_VERSION}); upgrade deltagrad-ray")
        g = _Getter(d, uri)
        try:
            opt = g.dict("optimizer")
            lr = _Getter(opt, uri, "optimizer").dict("lr")
            lr_g = _Getter(lr, uri, "optimizer.lr")
            training = Training(
                ModelSpec.from_dict(g.dict("model")), _Getter(opt, uri, "optimizer").choice("kind", OPTIMIZERS),
                lr_g.number("base"), tuple(int(m) for m in lr_g.list("milestones")), lr_g.number("gamma"),
                g.number("l2"), g.int("seed"), BatchPlan.from_dict(g.dict("plan")), g.int("steps"),
                g.choice("dtype", DTYPES))
            data = g.dict("data")
            dg = _Getter(data, uri, "data")
            parent = d.get("parent")
            m = cls(training,
                    DataRef(dg.str("uri"), dg.str("fingerprint"), dg.int("n"), dg.int("d"), dg.str("dtype")),
                    g.int("n_rows"),
                    None if parent is None else ParentRef(str(parent["uri"]), str(parent["run_id"])),
                    tuple(dict(c) for c in g.list("changes", default=[])),
                    g.str("run_id"), g.str("created"), g.int("shard_steps"),
                    None if d.get("row_group_steps") is None else g.int("row_group_steps"),
                    g.str("storage_dtype", default=training.dtype),
                    tuple(ShardRef(str(s["path"]), int(s["start"]), int(s["stop"]), int(s["bytes"]), str(s["sha256"]))
                          for s in g.list("shards")),
                    {str(k): FileRef(int(f["bytes"]), str(f["sha256"])) for k, f in g.dict("files").items()},
                    version)
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(f"{uri}: malformed manifest ({type(e).__name__}: {e})") from None
        except InputError as e:  # a model spec or plan that does not validate
            raise StorageError(f"{uri}: malformed manifest ({e})") from None
        stated = d.get("training_digest")
        if stated is not None and stated != training.digest():
            raise StorageError(f"{uri}: the manifest's training settings do not match its own digest (edited "
                               "after it was written?); the cache cannot be trusted")
        m._check_shards(uri)
        return m

    @classmethod
    def from_json(cls, text: str, uri: str = "manifest.json") -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise StorageError(f"{uri}: not valid JSON ({e})") from None
        return cls.from_dict(d, uri)

    def _check_shards(self, uri: str) -> None:
        """The shards must cover steps [0, T) in order, without gaps or overlaps."""
        at = 0
        for s in self.shards:
            if s.start != at or s.stop <= s.start:
                raise StorageError(f"{uri}: shard {s.path} holds steps [{s.start}, {s.stop}), expected it to start "
                                   f"at step {at}")
            at = s.stop
        if at != self.training.steps:
            raise StorageError(f"{uri}: the shards cover {at} steps, the run has {self.training.steps}")


class _Getter:
    """Typed access to a JSON object, with the field's path in every error."""

    def __init__(self, d, uri: str, prefix: str = "") -> None:
        if not isinstance(d, dict):
            raise TypeError(f"{prefix or 'the manifest'} must be an object")
        self.d, self.uri, self.prefix = d, uri, prefix

    def _get(self, key: str, default=KeyError):
        if key not in self.d:
            if default is KeyError:
                raise KeyError(f"missing field {self.prefix + '.' if self.prefix else ''}{key}")
            return default
        return self.d[key]

    def _bad(self, key: str, what: str, v) -> TypeError:
        return TypeError(f"field {self.prefix + '.' if self.prefix else ''}{key} must be {what}, got {v!r}")

    def int(self, key: str):
        v = self._get(key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, "an integer", v)
        return v

    def number(self, key: str):
        v = self._get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._bad(key, "a number", v)
        return float(v)

    def str(self, key: str, default=KeyError):
        v = self._get(key, default)
        if not isinstance(v, str):
            raise self._bad(key, "a string", v)
        return v

    def dict(self, key: str):
        v = self._get(key)
        if not isinstance(v, dict):
            raise self._bad(key, "an object", v)
        return v

    def list(self, key: str, default=KeyError):
        v = self._get(key, default)
        if not isinstance(v, list):
            raise self._bad(key, "a list", v)
        return v

    def choice(self, key: str, allowed: tuple[str, ...]):
        v = self._get(key)
        if v not in allowed:
            raise self._bad(key, f"one of {', '.join(allowed)}", v)
        return v
