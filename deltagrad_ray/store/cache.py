"""The trajectory cache: Parquet shards of per-step vectors, plus a JSON manifest written last.

Layout under the cache location::

    manifest.json                      written last: a cache without it does not exist
    initial.safetensors                θ_0   (a model file)
    model.safetensors                  θ_T   (a model file: the trained model)
    shards/part-00000-<run>.parquet    steps [0, k): step, lr, params, grads
    shards/part-00001-<run>.parquet    …
    removed.parquet                    (derived caches) rows deleted by earlier changes
    added.parquet                      (derived caches) rows added by earlier changes

Vectors are fixed-size-list columns, so a shard reads back into a (k, p) array without
per-row objects. Every file's sha256 is in the manifest and is checked on read. Shard file
names carry the run id, so a crashed writer's leftovers never collide with a later run.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..core.data import Dataset
from ..core.errors import InputError
from ..core.models import FunctionalModel, ModelSpec
from ..core.schedule import BatchPlan
from ..core.trajectory import Segment, Trajectory
from ..core.data import concat
from .datasets import dataset_from_table, fingerprint, read_dataset, table_bytes
from .location import Location, StorageError, location
from .models import model_bytes, parse_model

FORMAT = "deltagrad-ray-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_BYTES = 64 << 20

_NP = {torch.float64: np.float64, torch.float32: np.float32}
_TORCH = {"float64": torch.float64, "float32": torch.float32}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shard_steps_for(p: int, itemsize: int, shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """Steps per shard so that a shard holds about ``shard_bytes`` (θ and g per step)."""
    return max(1, shard_bytes // (2 * p * itemsize))


@dataclass(frozen=True)
class ShardRef:
    """One shard as listed in the manifest."""

    path: str     # relative to the cache root
    start: int    # first step
    stop: int     # one past the last step
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"path": self.path, "start": self.start, "stop": self.stop, "bytes": self.bytes,
                "sha256": self.sha256}


def _vectors(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


def shard_bytes(start: int, params: np.ndarray, grads: np.ndarray, lrs: np.ndarray) -> bytes:
    k = params.shape[0]
    table = pa.table({"step": pa.array(np.arange(start, start + k, dtype=np.int64)),
                      "lr": pa.array(lrs.astype(np.float64)),
                      "params": _vectors(params), "grads": _vectors(grads)})
    return table_bytes(table, compression="none", row_group_size=k)


def read_verified(loc: Location, expected: str, size: int | None = None) -> bytes:
    """Bytes of ``loc``, checked against the manifest's sha256 (and size)."""
    raw = loc.read_bytes()
    if size is not None and len(raw) != size:
        raise StorageError(f"{loc.uri}: {len(raw)} bytes, the manifest says {size} (truncated or replaced)")
    got = sha256(raw)
    if got != expected:
        raise StorageError(f"{loc.uri}: checksum mismatch (got {got[:19]}…, manifest says {expected[:19]}…); "
                           "the file is corrupted or was replaced")
    return raw


class CacheWriter:
    """A core :class:`~deltagrad_ray.core.train.Recorder` that writes shards as training runs.

    Holds at most one shard in memory; :meth:`commit` writes the model files and, last, the
    manifest. Refuses to start if a committed cache already exists at ``root``.
    """

    def __init__(self, root: Location, lrs: torch.Tensor, p: int, dtype: torch.dtype, *,
                 shard_steps: int | None = None) -> None:
        if root.join(MANIFEST).exists():
            raise StorageError(f"{root.uri}: a trajectory cache already exists here; "
                               "choose a new location (caches are never overwritten)")
        self.root, self.p, self.dtype = root, p, dtype
        self.lrs = lrs.detach().cpu().numpy().astype(np.float64)
        self.steps = len(self.lrs)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.shard_steps = max(1, min(shard_steps or shard_steps_for(p, itemsize), self.steps))
        self.run_id = uuid.uuid4().hex[:12]
        self.shards: list[ShardRef] = []
        self._params = np.empty((self.shard_steps, p), dtype=_NP[dtype])
        self._grads = np.empty((self.shard_steps, p), dtype=_NP[dtype])
        self._start = 0
        self._count = 0

    def record(self, step: int, theta: torch.Tensor, grad: torch.Tensor) -> None:
        if step != self._start + self._count:
            raise ValueError(f"steps must be recorded in order: got {step}, expected {self._start + self._count}")
        self._params[self._count] = theta.detach().cpu().numpy()
        self._grads[self._count] = grad.detach().cpu().numpy()
        self._count += 1
        if self._count == self.shard_steps:
            self._flush()

    def _flush(self) -> None:
        if self._count == 0:
            return
        a, b = self._start, self._start + self._count
        raw = shard_bytes(a, self._params[: self._count], self._grads[: self._count], self.lrs[a:b])
        rel = f"shards/part-{len(self.shards):05d}-{self.run_id}.parquet"
        self.root.join(rel).write_bytes(raw)
        self.shards.append(ShardRef(rel, a, b, len(raw), sha256(raw)))
        self._start, self._count = b, 0

    def finish(self, lrs: torch.Tensor) -> ParquetSource:
        self._flush()
        if self._start != self.steps:
            raise ValueError(f"recorded {self._start} steps, expected {self.steps}")
        return ParquetSource(self.root, tuple(self.shards), self.p, self.dtype)

    def commit(self, manifest: dict, model: FunctionalModel, initial: torch.Tensor, final: torch.Tensor,
               extra_files: dict[str, bytes] | None = None) -> Location:
        """Write θ_0, θ_T, any extra files, then the manifest (the commit)."""
        files = {}
        for name, raw in {"initial.safetensors": model_bytes(model, initial),
                          "model.safetensors": model_bytes(model, final, {"cache_run_id": self.run_id}),
                          **(extra_files or {})}.items():
            self.root.join(name).write_bytes(raw)
            files[name] = {"bytes": len(raw), "sha256": sha256(raw)}
        manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION, "run_id": self.run_id,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "steps": self.steps, "shard_steps": self.shard_steps, "dtype": dtype_name(self.dtype),
                    "shards": [s.to_dict() for s in self.shards], "files": files}
        self.root.join(MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return self.root


class ParquetSource:
    """Per-step vectors read shard by shard from storage, each shard verified on read."""

    def __init__(self, root: Location, shards: tuple[ShardRef, ...], p: int, dtype: torch.dtype) -> None:
        self.root, self.shards, self.p, self.dtype = root, shards, p, dtype

    def read_shard(self, ref: ShardRef) -> Segment:
        loc = self.root.join(ref.path)
        raw = read_verified(loc, ref.sha256, ref.bytes)
        table = pq.read_table(io.BytesIO(raw))
        k = table.num_rows
        steps = table.column("step").to_numpy()
        if k != ref.stop - ref.start or (k and (steps[0] != ref.start or steps[-1] != ref.stop - 1)):
            raise StorageError(f"{loc.uri}: holds steps {steps[:1]}..{steps[-1:]} , manifest says "
                               f"[{ref.start}, {ref.stop})")

        def vecs(name: str) -> torch.Tensor:
            arr = table.column(name).combine_chunks()
            if arr.type.list_size != self.p:
                raise StorageError(f"{loc.uri}: column {name} has width {arr.type.list_size}, expected {self.p}")
            flat = arr.values.to_numpy(zero_copy_only=False)
            return torch.from_numpy(flat.reshape(k, self.p).astype(_NP[self.dtype], copy=True))

        return Segment(ref.start, vecs("params"), vecs("grads"),
                       torch.from_numpy(table.column("lr").to_numpy().astype(np.float64)))

    def segments(self, start: int, stop: int) -> Iterator[Segment]:
        for ref in self.shards:
            if ref.stop <= start or ref.start >= stop:
                continue
            seg = self.read_shard(ref)
            a, b = max(start, ref.start) - ref.start, min(stop, ref.stop) - ref.start
            if a or b != ref.stop - ref.start:
                seg = Segment(seg.start + a, seg.params[a:b], seg.grads[a:b], seg.lrs[a:b])
            yield seg


class Cache:
    """A committed trajectory cache: manifest, model, trajectory, and the data it belongs to.

    Open one with :func:`open_cache`. Nothing here writes to the cache.
    """

    def __init__(self, root: Location, manifest: dict) -> None:
        self.root, self.manifest = root, manifest
        self.spec = ModelSpec.from_dict(manifest["model"])
        self.dtype = _TORCH[manifest["dtype"]]
        self.model = self.spec.build()
        self.plan = BatchPlan.from_dict(manifest["plan"])
        self.l2 = float(manifest["l2"])
        self.n_rows = int(manifest["n_rows"])
        shards = tuple(ShardRef(**s) for s in manifest["shards"])
        self.source = ParquetSource(root, shards, self.model.p, self.dtype)
        self._initial = self._final = None

    @property
    def uri(self) -> str:
        return self.root.uri

    @property
    def steps(self) -> int:
        return int(self.manifest["steps"])

    @property
    def n_classes(self) -> int | None:
        return None if self.spec.task == "regression" else self.spec.n_classes

    def _model_file(self, name: str) -> torch.Tensor:
        ref = self.manifest["files"][name]
        raw = read_verified(self.root.join(name), ref["sha256"], ref["bytes"])
        return parse_model(raw, self.root.join(name).uri)[1].to(self.dtype)

    @property
    def final(self) -> torch.Tensor:
        """θ_T, the trained model's parameters."""
        if self._final is None:
            self._final = self._model_file("model.safetensors")
        return self._final

    @property
    def initial(self) -> torch.Tensor:
        if self._initial is None:
            self._initial = self._model_file("initial.safetensors")
        return self._initial

    def _row_file(self, name: str) -> bytes | None:
        ref = self.manifest["files"].get(name)
        return None if ref is None else read_verified(self.root.join(name), ref["sha256"], ref["bytes"])

    def removed_mask(self) -> torch.Tensor | None:
        raw = self._row_file("removed.parquet")
        if raw is None:
            return None
        rows = torch.from_numpy(pq.read_table(io.BytesIO(raw)).column("row").to_numpy().astype(np.int64))
        mask = torch.zeros(self.n_rows, dtype=torch.bool)
        mask[rows] = True
        return mask

    def trajectory(self, device: torch.device | str = "cpu") -> Trajectory:
        """The cached trajectory (per-step vectors streamed from storage)."""
        lrs = torch.tensor(self.manifest["lrs"], dtype=torch.float64)
        removed = self.removed_mask()
        return Trajectory(self.plan, self.l2, lrs, self.initial.to(device), self.final.to(device), self.n_rows,
                          None if removed is None else removed.to(device), self.source)

    def data(self, uri: str | Location | None = None, device: torch.device | str = "cpu") -> Dataset:
        """The training rows, from ``uri`` or the location recorded at training time.

        The data's fingerprint must match the one recorded in the manifest: unlearning against
        other data would silently produce a wrong model.
        """
        info = self.manifest["data"]
        src = location(uri if uri is not None else info["uri"])
        data = read_dataset(src, regression=self.spec.task == "regression")
        fp = fingerprint(data)
        if fp != info["fingerprint"]:
            raise InputError(f"{src.uri} is not the data set the cache {self.uri} was trained on "
                             f"(fingerprint {fp[:19]}…, the cache expects {info['fingerprint'][:19]}…)")
        added = self._row_file("added.parquet")
        if added is not None:
            extra = dataset_from_table(pq.read_table(io.BytesIO(added)), self.root.join("added.parquet").uri,
                                       self.spec.task == "regression")
            data = concat(data.to(dtype=extra.X.dtype), extra)
        if len(data) != self.n_rows:
            raise StorageError(f"{self.uri}: the cache covers {self.n_rows} rows, its data has {len(data)}")
        return data.to(dtype=self.dtype, device=device)


def read_manifest(root: Location) -> dict:
    mloc = root.join(MANIFEST)
    if not mloc.exists():
        if root.is_file() or (root.is_dir() and any(p.name.endswith(".parquet") for p in root.list())):
            raise InputError(f"{root.uri} is not a trajectory cache (no {MANIFEST}); is it a data set?")
        raise StorageError(f"{root.uri}: no trajectory cache here (no committed {MANIFEST})")
    try:
        manifest = json.loads(mloc.read_text())
    except json.JSONDecodeError as e:
        raise StorageError(f"{mloc.uri}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise StorageError(f"{mloc.uri}: not a deltagrad-ray cache manifest (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StorageError(f"{mloc.uri}: cache format version {version!r} is newer than this deltagrad-ray "
                           f"reads (<= {FORMAT_VERSION}); upgrade deltagrad-ray")
    return manifest


def open_cache(uri: str | Location) -> Cache:
    """Open a committed cache (reads only the manifest)."""
    root = location(uri)
    return Cache(root, read_manifest(root))
