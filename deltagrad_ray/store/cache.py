"""The trajectory cache: Parquet shards of per-step vectors, plus a JSON manifest written last.

Layout under the cache location::

    manifest.json                      written last: a cache without it does not exist
    initial.safetensors                θ_0   (a model file)
    model.safetensors                  θ_T   (a model file: the trained model)
    shards/part-00000-<run>.parquet    steps [0, k): step, lr, params, grads
    shards/part-00001-<run>.parquet    …
    rows.parquet                       id and 8-byte digest of each training row (caches from this release on)
    removed.parquet                    (derived caches) rows deleted by earlier changes
    added.parquet                      (derived caches) rows added by earlier changes

Vectors are fixed-size-list columns, so a shard reads back into a (k, p) array without
per-row objects. Row groups hold ``row_group_steps`` steps (a multiple of the DeltaGrad period),
so a reader that needs only some steps of a shard fetches just those row groups (ranged GETs on
S3), verified by Parquet page checksums; a whole shard is verified against the sha256 in the
manifest. Shard file names carry the run id, so a crashed writer's leftovers never collide
with a later run. Vectors can be stored in a lower precision than training used
(``storage_dtype`` float16 / bfloat16, kept as their 16 raw bits) to halve the bytes moved.

URIs read back from a manifest (the training data's, a parent cache's) are stored records, not
the operator's word: they resolve through :func:`~.location.recorded_location`, so S3 settings
stored with them (an endpoint, a scheme) are used only when they are the ones the operator gave
(this process's settings, or those of the cache's own location) — an edited manifest cannot send
this process's signed requests to another host.

The training data is checked at every read against the fingerprint in the manifest. When the
owner rewrites it without rows a cache has erased (the source rows must go too), the fingerprint
no longer matches; a cache with ``rows.parquet`` then checks the data row by row instead: it must
be the original rows, in their order, with only rows this cache removed left out. Those come back
as placeholders (their id, zero features, label 0), so row positions, ``n_rows`` and the removed
mask stay valid; removed rows never enter a gradient (their weight is 0), so placeholders never
contribute.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..core.config import DTYPES
from ..core.data import Dataset, concat
from ..core.errors import InputError
from ..core.models import FunctionalModel
from ..core.trajectory import Segment, Trajectory
from .datasets import (FEATURE_COPY, dataset_from_table, dataset_table, fingerprint, parquet_table, read_dataset,
                       read_ids_labels, read_rows, row_digests, table_bytes)
from .location import Location, StorageError, location, recorded_location
from .manifest import DIGEST_KEY, DataRef, FileRef, Manifest, ParentRef, ShardRef, Training
from .models import model_bytes, parse_model

MANIFEST = "manifest.json"
ROW_DIGESTS = "rows.parquet"  # per training row: id, digest (datasets.row_digests); in the manifest's files
ROW_FILES = (ROW_DIGESTS, "removed.parquet", "added.parquet")  # a cache's own Parquet files, beside the manifest
DEFAULT_SHARD_BYTES = 64 << 20

_TORCH = {**DTYPES, "float16": torch.float16, "bfloat16": torch.bfloat16}  # the training dtypes and two narrower
STORAGE_DTYPES = tuple(_TORCH)


def _vector_values(t: torch.Tensor) -> pa.Array:
    """(k, p) tensor → flat Arrow values: float64/32, Parquet FLOAT16, or bfloat16 as 2-byte
    fixed-size binary (Parquet has no bfloat16 type; the manifest records it)."""
    if t.dtype == torch.float16:
        return pa.array(t.numpy().reshape(-1))
    if t.dtype == torch.bfloat16:
        raw = t.contiguous().view(torch.int16).numpy()
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2), raw.size, [None, pa.py_buffer(raw)])
    return pa.array(t.numpy().reshape(-1))


def _from_values(values: pa.Array, k: int, p: int, storage: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """(k, p) tensor over the decoded Arrow buffer, without a copy when no conversion is needed.

    Arrow marks its buffers read-only, so torch warns that writing to the tensor would be
    undefined; nothing writes to it: trajectories are read-only by design (replays never modify
    the cache), and the buffer is private memory that the tensor keeps alive."""
    if values.null_count:
        raise StorageError("null values in a trajectory column")
    itemsize = torch.empty(0, dtype=storage).element_size()
    buf = values.buffers()[1]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(buf, dtype=torch.int16 if storage == torch.bfloat16 else storage,
                                count=k * p, offset=values.offset * itemsize)
    if storage == torch.bfloat16:
        flat = flat.view(torch.bfloat16)
    return flat.view(k, p).to(dtype)


def storage_dtype(name: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        name = dtype_name(name)
    if name not in _TORCH:
        raise InputError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {name!r}")
    return _TORCH[name]


def sha256(data) -> str:
    """sha256 of bytes or an Arrow buffer (hashlib releases the GIL on large inputs)."""
    return "sha256:" + hashlib.sha256(memoryview(data)).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shard_steps_for(p: int, itemsize: int, shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """Steps per shard so that a shard holds about ``shard_bytes`` (θ and g per step)."""
    return max(1, shard_bytes // (2 * p * itemsize))


def row_group_steps_for(p: int, itemsize: int, period: int = 10, group_bytes: int = 8 << 20) -> int:
    """Steps per Parquet row group: a multiple of ``period`` (default 10, a multiple of the
    default T0 = 5 and j0 = 10) holding about ``group_bytes``."""
    per_period = 2 * p * itemsize * period
    return period * max(1, group_bytes // per_period)


def _vectors(t: torch.Tensor) -> pa.FixedSizeListArray:
    values = _vector_values(t)
    vtype = pa.list_(pa.field("element", values.type, nullable=False), t.shape[1])
    return pa.FixedSizeListArray.from_arrays(values, type=vtype)


def shard_bytes(start: int, params: torch.Tensor, grads: torch.Tensor, lrs: np.ndarray,
                row_group_steps: int, digest: str | None = None) -> pa.Buffer:
    """One shard as Parquet; ``digest`` (the run's :meth:`~.manifest.Training.digest`) goes into its
    key-value metadata, so a manifest edited later no longer matches its shards."""
    k = params.shape[0]
    pv, gv = _vectors(params), _vectors(grads)
    # every field required: Parquet then stores no definition levels (measured: 2x faster to
    # encode and decode than nullable lists)
    schema = pa.schema([pa.field("step", pa.int64(), nullable=False), pa.field("lr", pa.float64(), nullable=False),
                        pa.field("params", pv.type, nullable=False), pa.field("grads", gv.type, nullable=False)])
    if digest is not None:
        schema = schema.with_metadata({DIGEST_KEY: digest.encode()})
    table = pa.Table.from_arrays([pa.array(np.arange(start, start + k, dtype=np.int64)),
                                  pa.array(lrs.astype(np.float64)), pv, gv], schema=schema)
    # no compression: zstd makes random floats bigger (docs/platform.md); no min/max statistics
    # (never used, and they halve the encoding speed); page checksums let a partial
    # (row-group) read be verified without the whole file
    return table_bytes(table, compression="none", row_group_size=row_group_steps, write_page_checksum=True,
                       use_dictionary=False, write_statistics=False)


def row_digest_file(data: Dataset) -> pa.Buffer:
    """``rows.parquet`` of a cache trained on ``data`` (as read: the bytes the fingerprint hashes)."""
    return table_bytes(pa.table({"id": pa.array(data.ids.cpu().numpy().astype(np.int64)),
                                 "digest": pa.array(row_digests(data))}))


def read_verified(loc: Location, expected: str, size: int | None = None) -> pa.Buffer:
    """Contents of ``loc``, checked against the manifest's sha256 (and size)."""
    raw = loc.read_buffer()
    if size is not None and len(raw) != size:
        raise StorageError(f"{loc.uri}: {len(raw)} bytes, the manifest says {size} (truncated or replaced)")
    got = sha256(raw)
    if got != expected:
        raise StorageError(f"{loc.uri}: checksum mismatch (got {got[:19]}…, manifest says {expected[:19]}…); "
                           "the file is corrupted or was replaced")
    return raw


def removed_rows_file(rows: torch.Tensor, ids: torch.Tensor):
    """``removed.parquet`` of a derived cache: the rows deleted so far (``row``) and their ids (``id``),
    read back by :meth:`Cache.removed_mask`."""
    return table_bytes(pa.table({"row": rows.cpu().numpy(), "id": ids.cpu().numpy()}))


def added_rows_file(rows: Dataset):
    """``added.parquet`` of a derived cache: the rows added so far, as a data set's table (read back
    with the cache's data)."""
    return table_bytes(dataset_table(rows))


def check_new_cache(root: Location) -> None:
    """Refuse a location that already holds a committed cache: caches are never overwritten."""
    if root.join(MANIFEST).exists():
        raise StorageError(f"{root.uri}: a trajectory cache already exists here; "
                           "choose a new location (caches are never overwritten)")


class CacheWriter:
    """A core :class:`~deltagrad_ray.core.train.Recorder` that writes shards as training (or a
    recorded replay) runs.

    Holds at most one shard in memory; :meth:`commit` writes the model files and, last, the
    manifest. Refuses to start if a committed cache already exists at ``root``. A run that fails
    or is interrupted calls :meth:`abort`, which removes what the writer wrote: no orphan shards.

    Every recorded vector is checked before it is stored: a value that is not finite, or beyond
    the range of the storage dtype (float16 holds up to 65504; stored, it would become inf), is
    refused at that step with the largest value seen and the dtypes that would hold it, before
    anything is committed.

    Args:
      root: the cache location.
      training: the run being recorded (its schedule is stored per step; its digest in every shard).
      shard_steps / shard_bytes: shard size, in steps or bytes (default ~64 MB).
      storage: dtype of the stored vectors (default: the training dtype).
      row_group_steps: steps per row group (default: a multiple of 10 of ~8 MB).
    """

    WRITERS = 2  # shards in flight (one writer thread reached 44% of the disk's raw write speed)

    def __init__(self, root: Location, training: Training, *, shard_steps: int | None = None,
                 shard_bytes: int | None = None, storage: str | torch.dtype | None = None,
                 row_group_steps: int | None = None) -> None:
        check_new_cache(root)
        if shard_steps is not None and shard_steps < 1:
            raise InputError(f"shard steps must be >= 1, got {shard_steps}")
        if shard_bytes is not None and shard_bytes < 1:
            raise InputError(f"shard bytes must be >= 1, got {shard_bytes}")
        self.root, self.training = root, training
        self.p, self.dtype = training.model.build().p, _TORCH[training.dtype]
        self.digest = training.digest()
        self.storage = storage_dtype(storage, self.dtype)
        self.lrs = training.learning_rates().numpy().astype(np.float64)
        self.steps = len(self.lrs)
        itemsize = torch.empty(0, dtype=self.storage).element_size()
        steps = shard_steps or shard_steps_for(self.p, itemsize, shard_bytes or DEFAULT_SHARD_BYTES)
        self.shard_steps = max(1, min(steps, self.steps))
        self.row_group_steps = min(row_group_steps or row_group_steps_for(self.p, itemsize), self.shard_steps)
        self.run_id = uuid.uuid4().hex[:12]
        self.shards: list[ShardRef] = []
        self._params = torch.empty(self.shard_steps, self.p, dtype=self.storage)
        self._grads = torch.empty(self.shard_steps, self.p, dtype=self.storage)
        self._free: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._start = 0
        self._count = 0
        # up to WRITERS shards are encoded, hashed and uploaded by background threads while the
        # next one fills (WRITERS + 1 buffers at most): the caller keeps computing, and the
        # encoding of one shard overlaps the upload (or fsync) of another
        self._pool = ThreadPoolExecutor(max_workers=self.WRITERS, thread_name_prefix="shard-writer")
        self._pending: list = []
        self._written: list[Location] = []  # every file written, for abort()
        # the largest magnitude the storage dtype holds, when it is below the training dtype's
        # (float16: 65504): larger values would be stored as inf
        big, own = torch.finfo(self.storage).max, torch.finfo(self.dtype).max
        self._limit = big if big < own else None

    def _check(self, step: int, theta: torch.Tensor, grad: torch.Tensor) -> None:
        """Refuse a step whose vectors the storage dtype cannot hold (or that are not finite)."""
        if self._limit is None and math.isfinite(float(theta.detach().sum() + grad.detach().sum())):
            return  # the storage dtype holds every finite value (one reduction; NaN or inf make it non-finite)
        peaks = torch.stack([theta.detach().abs().max(), grad.detach().abs().max()]).double().cpu()
        top = float(peaks.max()) if bool(torch.isfinite(peaks).all()) else float("nan")
        if not math.isfinite(top):
            which = "θ" if not bool(torch.isfinite(peaks[0])) else "the gradient"
            raise InputError(f"step {step}: {which} is not finite (NaN or inf) and cannot be stored (the run "
                             "diverged); nothing was committed")
        if self._limit is not None and top > self._limit:
            which = "θ" if float(peaks[0]) >= float(peaks[1]) else "the gradient"
            holders = [n for n in ("float32", "bfloat16") if torch.finfo(_TORCH[n]).max >= top] or ["float64"]
            raise InputError(f"step {step}: {which} holds {top:.4g}, beyond the range of the storage dtype "
                             f"{dtype_name(self.storage)} (largest {self._limit:.6g}; it would be stored as inf); "
                             f"store the cache as {' or '.join(holders)} (--storage-dtype) "
                             "— or, if values this large are unexpected, the run is diverging: use a smaller "
                             "learning rate (--lr); nothing was committed")

    def record(self, step: int, theta: torch.Tensor, grad: torch.Tensor) -> None:
        if step != self._start + self._count:
            raise ValueError(f"steps must be recorded in order: got {step}, expected {self._start + self._count}")
        self._check(step, theta, grad)
        self._params[self._count] = theta.detach()
        self._grads[self._count] = grad.detach()
        self._count += 1
        if self._count == self.shard_steps:
            self._flush()

    def _write_shard(self, index: int, a: int, params: torch.Tensor, grads: torch.Tensor) -> ShardRef:
        raw = shard_bytes(a, params, grads, self.lrs[a:a + len(params)], self.row_group_steps, self.digest)
        rel = f"shards/part-{index:05d}-{self.run_id}.parquet"
        self.root.join(rel).write_bytes(raw)
        self._written.append(self.root.join(rel))
        return ShardRef(rel, a, a + len(params), raw.size, sha256(raw))

    def _wait(self, keep: int) -> None:
        """Wait for written shards, oldest first, until at most ``keep`` are in flight."""
        while len(self._pending) > keep:
            job, buffers = self._pending.pop(0)
            self.shards.append(job.result())  # re-raises a failed upload here; order is kept
            self._free.append(buffers)

    def _flush(self) -> None:
        if self._count == 0:
            return
        self._wait(self.WRITERS - 1)  # a writer is free, and so is its buffer
        a, full = self._start, (self._params, self._grads)
        job = self._pool.submit(self._write_shard, len(self.shards) + len(self._pending), a,
                                self._params[: self._count], self._grads[: self._count])
        self._pending.append((job, full))
        self._params, self._grads = self._free.pop() if self._free else (torch.empty_like(self._params),
                                                                         torch.empty_like(self._grads))
        self._start, self._count = a + self._count, 0

    def finish(self, lrs: torch.Tensor) -> ParquetSource:
        try:
            self._flush()
            self._wait(0)
        finally:
            self._pool.shutdown(wait=True)
        if self._start != self.steps:
            raise ValueError(f"recorded {self._start} steps, expected {self.steps}")
        return ParquetSource(self.root, tuple(self.shards), self.p, self.dtype, self.storage, self.row_group_steps,
                             lrs=self.lrs, digest=self.digest)

    def commit(self, *, data: DataRef, n_rows: int, model: FunctionalModel, initial: torch.Tensor,
               final: torch.Tensor, parent: ParentRef | None = None, changes: tuple[dict, ...] = (),
               extra_files: dict[str, bytes] | None = None) -> Manifest:
        """Write θ_0, θ_T, any extra files, then the manifest (the commit)."""
        files = {}
        for name, raw in {"initial.safetensors": model_bytes(model, initial),
                          "model.safetensors": model_bytes(model, final, {"cache_run_id": self.run_id}),
                          **(extra_files or {})}.items():
            self.root.join(name).write_bytes(raw)
            self._written.append(self.root.join(name))
            files[name] = FileRef(len(raw), sha256(raw))
        manifest = Manifest(self.training, data, n_rows, parent, tuple(changes), self.run_id,
                            _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), self.shard_steps,
                            self.row_group_steps, dtype_name(self.storage), tuple(self.shards), files)
        self.root.join(MANIFEST).write_text(manifest.to_json())
        self._written.clear()  # committed: nothing to abort any more
        return manifest

    def abort(self, extra: tuple[Location, ...] | list[Location] = ()) -> int:
        """Remove what this writer wrote (shards, model files) and ``extra`` locations, once the
        writes in flight have ended: a failed or interrupted run leaves no orphan shards behind (its
        location holds no manifest, so it never was a cache). Removal is best effort (a storage
        that fails now keeps what it cannot delete).

        Returns:
          The number of files removed.
        """
        for job, _ in self._pending:
            job.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()
        removed = 0
        for loc in [*self._written, *extra]:
            try:
                if loc.exists():
                    loc.delete()
                    removed += 1
            except StorageError:
                pass
        self._written.clear()
        if self.root.is_local:  # the folders the run made, when nothing else is in them
            import os
            for sub in ("shards", "data", ""):
                try:
                    os.rmdir(self.root.join(sub).path if sub else self.root.path)
                except OSError:
                    pass
        return removed


class ParquetSource:
    """Per-step vectors streamed shard by shard from storage.

    While the caller computes on one shard, the next ``prefetch`` (default 2) are fetched,
    verified and decoded by background threads, so at most ``prefetch + 1`` shards are in memory
    whatever T is. A whole shard is checked against its sha256; a partial one (only some row
    groups) by Parquet page checksums. Every shard must also agree with the manifest it is read
    through: its learning rates with the manifest's schedule (``lrs``), and the training digest in
    its footer, when it has one, with the manifest's (``digest``).
    """

    def __init__(self, root: Location, shards: tuple[ShardRef, ...], p: int, dtype: torch.dtype,
                 storage: torch.dtype | None = None, row_group_steps: int | None = None, prefetch: int = 2, *,
                 lrs: np.ndarray | None = None, digest: str | None = None) -> None:
        self.root, self.shards, self.p, self.dtype = root, shards, p, dtype
        self.storage = storage or dtype
        self.row_group_steps = row_group_steps
        self.prefetch = max(1, prefetch)
        self.lrs, self.digest = lrs, digest

    def check_digest(self, metadata: dict | None, uri: str) -> None:
        """A shard written for other training settings than the manifest states is refused."""
        got = (metadata or {}).get(DIGEST_KEY)
        if self.digest is not None and got is not None and got.decode() != self.digest:
            raise StorageError(f"{uri}: this shard was written for other training settings than the manifest "
                               "states (learning rates, λ, batch plan, model or steps); the manifest was edited or "
                               "the shard belongs to another cache")

    def _decode(self, table: pa.Table, uri: str, start: int, stop: int) -> Segment:
        k = table.num_rows
        steps = table.column("step").to_numpy()
        if k != stop - start or (k and (steps[0] != start or steps[-1] != stop - 1)):
            raise StorageError(f"{uri}: holds steps {steps[:1]}..{steps[-1:]}, expected [{start}, {stop})")
        self.check_digest(table.schema.metadata, uri)
        lrs = table.column("lr").to_numpy().astype(np.float64)
        if self.lrs is not None and not np.array_equal(lrs, self.lrs[start:stop]):
            bad = int(np.nonzero(lrs != self.lrs[start:stop])[0][0])
            raise StorageError(f"{uri}: learning rate {lrs[bad]:g} at step {start + bad}, the manifest's schedule "
                               f"says {self.lrs[start + bad]:g}; the manifest and the shards disagree")

        def vecs(name: str) -> torch.Tensor:
            arr = table.column(name).combine_chunks()
            if arr.type.list_size != self.p:
                raise StorageError(f"{uri}: column {name} has width {arr.type.list_size}, expected {self.p}")
            v = _from_values(arr.values, k, self.p, self.storage, self.dtype)
            if not bool(torch.isfinite(v).all()):  # caches written before CacheWriter checked its inputs
                bad = start + int(torch.nonzero(~torch.isfinite(v).all(dim=1))[0])
                raise InputError(f"{uri}: step {bad} holds non-finite {name} (NaN or inf: a diverged run, or values "
                                 "beyond the storage dtype's range); train the cache again (a smaller --lr, or "
                                 "--storage-dtype float32)")
            return v

        return Segment(start, vecs("params"), vecs("grads"), torch.from_numpy(lrs))

    def read_shard(self, ref: ShardRef) -> Segment:
        """A whole shard, verified against the manifest's sha256."""
        loc = self.root.join(ref.path)
        raw = read_verified(loc, ref.sha256, ref.bytes)
        try:
            table = parquet_table(raw)
        except (pa.ArrowInvalid, OSError) as e:
            raise StorageError(f"{loc.uri}: not a readable shard ({e})") from None
        return self._decode(table, loc.uri, ref.start, ref.stop)

    def read_steps(self, ref: ShardRef, start: int, stop: int) -> Segment:
        """Steps [start, stop) of a shard, fetching only the row groups that hold them."""
        if start <= ref.start and stop >= ref.stop or not self.row_group_steps:
            seg = self.read_shard(ref)
        else:
            loc = self.root.join(ref.path)
            rg = self.row_group_steps
            first, last = (max(start, ref.start) - ref.start) // rg, (min(stop, ref.stop) - 1 - ref.start) // rg
            try:
                with loc.open_random_access() as f:
                    pf = pq.ParquetFile(f, page_checksum_verification=True)
                    table = pf.read_row_groups(list(range(first, last + 1)))
                    table = table.replace_schema_metadata(pf.schema_arrow.metadata)
            except (pa.ArrowInvalid, OSError) as e:
                raise StorageError(f"{loc.uri}: row groups {first}..{last} failed verification or could not "
                                   f"be read ({e})") from None
            a = ref.start + first * rg
            seg = self._decode(table, loc.uri, a, min(ref.start + (last + 1) * rg, ref.stop))
        a, b = max(start, seg.start) - seg.start, min(stop, seg.stop) - seg.start
        if a or b != seg.stop - seg.start:
            seg = Segment(seg.start + a, seg.params[a:b], seg.grads[a:b], seg.lrs[a:b])
        return seg

    def segments(self, start: int, stop: int) -> Iterator[Segment]:
        refs = [r for r in self.shards if r.stop > start and r.start < stop]
        if not refs:
            return
        from collections import deque
        with ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="shard-prefetch") as pool:
            pending = deque(pool.submit(self.read_steps, r, start, stop) for r in refs[: self.prefetch])
            nxt = len(pending)
            try:
                while pending:
                    seg = pending.popleft().result()
                    if nxt < len(refs):  # keep `prefetch` shards coming while the caller computes
                        pending.append(pool.submit(self.read_steps, refs[nxt], start, stop))
                        nxt += 1
                    yield seg
                    del seg
            finally:
                for f in pending:
                    f.cancel()


class Cache:
    """A committed trajectory cache: manifest, model, trajectory, and the data it belongs to.

    Open one with :func:`open_cache`. Nothing here writes to the cache.

    Attributes:
      manifest: the typed :class:`~.manifest.Manifest`.
      spec, model, dtype, storage, plan, l2, n_rows, steps: short names for its settings.
    """

    def __init__(self, root: Location, manifest: Manifest) -> None:
        self.root, self.manifest = root, manifest
        t = manifest.training
        self.spec = t.model
        self.dtype = _TORCH[t.dtype]
        self.storage = _TORCH[manifest.storage_dtype]
        self.model = self.spec.build()
        self.plan = t.plan
        self.l2 = t.l2
        self.n_rows = manifest.n_rows
        self.steps = t.steps
        self.lrs = t.learning_rates()  # the one schedule: exact retraining and the replay both use it
        self.source = ParquetSource(root, manifest.shards, self.model.p, self.dtype, self.storage,
                                    manifest.row_group_steps, lrs=self.lrs.numpy(), digest=t.digest())
        self._initial = self._final = None
        self._shards_checked = False
        self._digests: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def uri(self) -> str:
        return self.root.uri

    @property
    def n_classes(self) -> int | None:
        return None if self.spec.task == "regression" else self.spec.n_classes

    def _model_file(self, name: str) -> torch.Tensor:
        ref = self.manifest.files[name]
        raw = read_verified(self.root.join(name), ref.sha256, ref.bytes)
        return parse_model(raw.to_pybytes(), self.root.join(name).uri)[1].to(self.dtype)

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
        ref = self.manifest.files.get(name)
        return None if ref is None else read_verified(self.root.join(name), ref.sha256, ref.bytes)

    def removed_mask(self) -> torch.Tensor | None:
        raw = self._row_file("removed.parquet")
        if raw is None:
            return None
        rows = torch.from_numpy(parquet_table(raw).column("row").to_numpy().astype(np.int64))
        mask = torch.zeros(self.n_rows, dtype=torch.bool)
        mask[rows] = True
        return mask

    def check_shards(self) -> None:
        """Refuse a cache whose shards were written for other training settings than its manifest
        states (an edited manifest): reads the first shard's footer (a ranged read), once."""
        if self._shards_checked or not self.manifest.shards:
            return
        ref = self.manifest.shards[0]
        loc = self.root.join(ref.path)
        try:
            with loc.open_random_access() as f:
                metadata = pq.ParquetFile(f).schema_arrow.metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise StorageError(f"{loc.uri}: not a readable shard ({e})") from None
        self.source.check_digest(metadata, loc.uri)
        self._shards_checked = True

    def trajectory(self, device: torch.device | str = "cpu") -> Trajectory:
        """The cached trajectory (per-step vectors streamed from storage); its settings are checked
        against the shards' first (see :meth:`check_shards`), so exact retraining from it (which reads
        no shard) cannot follow an edited manifest either."""
        self.check_shards()
        lrs = self.lrs
        removed = self.removed_mask()
        return Trajectory(self.plan, self.l2, lrs, self.initial.to(device), self.final.to(device), self.n_rows,
                          None if removed is None else removed.to(device), self.source)

    def data(self, uri: str | Location | None = None, device: torch.device | str = "cpu") -> Dataset:
        """The training rows, from ``uri`` or the location recorded at training time.

        The data's fingerprint must match the one recorded in the manifest: unlearning against
        other data would silently produce a wrong model.
        """
        src = self.data_location(uri)
        data = self._mapped(src) if uri is None or self._is_recorded(src) else None
        if data is None:
            data = read_dataset(src, regression=self.spec.task == "regression")
            data = self._verified(src, data, fingerprint(data))
        extra = self.added_rows()
        if extra is not None:
            data = concat(data.to(dtype=extra.X.dtype), extra)
        self._check_covers(len(data))
        return data.to(dtype=self.dtype, device=device)

    def data_rows(self, start: int, stop: int, uri: str | Location | None = None,
                  device: torch.device | str = "cpu") -> Dataset:
        """Rows [start, stop) of :meth:`data`, reading every row once (the fingerprint covers
        all) but holding only these and one row group at a time: a data shard's part. A data set
        rewritten without erased rows (see :meth:`data`) is read again whole, then checked row by
        row: a slice of it is another slice of the original."""
        src = self.data_location(uri)
        extra = self.added_rows()
        n_added = 0 if extra is None else len(extra)
        n_file = self.n_rows - n_added
        if not 0 <= start <= stop <= self.n_rows:
            raise InputError(f"rows [{start}, {stop}) are not within the {self.n_rows} rows of the cache {self.uri}")
        regression = self.spec.task == "regression"
        data, n, fp = read_rows(src, min(start, n_file), min(stop, n_file), regression=regression)
        if fp != self.manifest.data.fingerprint:
            full = read_dataset(src, regression=regression)
            full = self._verified(src, full, fingerprint(full))
            data, n = full.rows(torch.arange(min(start, n_file), min(stop, n_file))), len(full)
        self._check_covers(n + n_added)
        if extra is not None and stop > n_file:
            data = concat(data.to(dtype=extra.X.dtype), extra.rows(torch.arange(max(start, n_file) - n_file,
                                                                                stop - n_file)))
        return data.to(dtype=self.dtype, device=device)

    def _mapped(self, src: Location) -> Dataset | None:
        """The training rows with the features mapped from the cache's local feature copy
        (``train --mmap-features``), verified like a Parquet read; None without a usable copy (a
        copy that does not match the recorded fingerprint is ignored, with a warning). The ids
        and labels come from ``src``: a data set rewritten without erased rows takes the kept
        rows' features from the copy (a copy, then, not a mapping), checked row by row."""
        copy = self._feature_copy()
        if copy is None:
            return None
        try:
            ids, y = read_ids_labels(src, regression=self.spec.task == "regression")
            X = np.load(copy.path, mmap_mode="c", allow_pickle=False)
            if X.ndim != 2 or X.shape[0] != self.manifest.data.n:
                raise InputError(f"features of shape {X.shape}, expected ({self.manifest.data.n}, d)")
        except (InputError, ValueError, OSError) as e:
            warnings.warn(f"{copy.uri}: feature copy not used ({e}); reading {src.uri}", stacklevel=3)
            return None
        if len(ids) == len(X):
            data = Dataset(torch.from_numpy(X), y, ids)
            if fingerprint(data) == self.manifest.data.fingerprint:
                return data
        elif self._row_digests() is not None:  # rewritten without some rows: which ones, checked first
            keep = self._kept_rows(src, ids.numpy())
            data = Dataset(torch.from_numpy(X[keep]), y, ids)
            if np.array_equal(row_digests(data), self._row_digests()[1][keep]):
                return self._with_placeholders(data, keep)
        warnings.warn(f"{copy.uri}: the feature copy does not match the data the cache was trained on; "
                      f"reading {src.uri}", stacklevel=3)
        return None

    def _feature_copy(self, depth: int = 64) -> Location | None:
        """The local feature copy of this cache, else of the nearest cache it derives from (a replay
        or an erasure version trains on the same data set, so its ancestor's copy serves it; the
        copy is verified against this cache's fingerprint on load). None when no cache up the
        lineage has one (it was never written, or retention deleted it)."""
        root: Location | None = self.root
        for _ in range(depth):
            if root is None or not root.is_local:
                return None
            copy = root.join(FEATURE_COPY)
            if copy.exists():
                return copy
            try:
                parent = open_cache(root).parent_location() if root is not self.root else self.parent_location()
            except (StorageError, InputError):
                return None
            root = parent
        return None

    def data_location(self, uri: str | Location | None = None) -> Location:
        """``uri`` (the operator's), else the data location recorded in the manifest, resolved as a
        stored URI: its S3 settings count only if they are the operator's
        (:func:`~.location.recorded_location`, read from this cache's root)."""
        return location(uri) if uri is not None else recorded_location(self.manifest.data.uri, self.root)

    def parent_location(self) -> Location | None:
        """The cache this one was derived from (a stored URI, resolved as :meth:`data_location` does)."""
        parent = self.manifest.parent
        return None if parent is None else recorded_location(parent.uri, self.root)

    def _is_recorded(self, src: Location) -> bool:
        """``src`` is the data location the manifest records (so the feature copy may stand in for it)."""
        rec = self.data_location()
        return src.is_local == rec.is_local and src.path.rstrip("/") == rec.path.rstrip("/") \
            and src.endpoint == rec.endpoint

    def _verified(self, src: Location, data: Dataset, fp: str) -> Dataset:
        """``data`` read from ``src`` if its fingerprint ``fp`` is the recorded one; else, for a cache
        with row digests, the original rows rebuilt from a data set rewritten without rows this cache
        removed (:meth:`_kept_rows`, then every kept row's digest); else an :class:`InputError`."""
        expected = self.manifest.data.fingerprint
        if fp == expected:
            return data
        recorded = self._row_digests()
        if recorded is None:
            raise InputError(f"{src.uri} is not the data set the cache {self.uri} was trained on "
                             f"(fingerprint {fp[:19]}…, the cache expects {expected[:19]}…); give the data set it "
                             "was trained on, or train the cache again with this release (its caches check a data "
                             "set rewritten without erased rows row by row)")
        if data.n_features != self.manifest.data.d:
            raise InputError(f"{self._not_the_data(src)}: rows of {data.n_features} features, the cache was "
                             f"trained on {self.manifest.data.d}")
        keep = self._kept_rows(src, data.ids.numpy())
        bad = np.nonzero(row_digests(data) != recorded[1][keep])[0]
        if len(bad):
            i = int(bad[0])
            raise InputError(f"{self._not_the_data(src)}: row {i} (id {int(data.ids[i])}) differs from the row "
                             f"the cache was trained on ({len(bad)} row(s) differ); only rows the cache erased may "
                             "change (by being left out)")
        return self._with_placeholders(data, keep)

    def _row_digests(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, digests) of the rows the cache was trained on, (n,) int64 and uint64 each, from
        ``rows.parquet`` (verified against the manifest); None for a cache from before it."""
        if self._digests is None and ROW_DIGESTS in self.manifest.files:
            t = parquet_table(self._row_file(ROW_DIGESTS))
            ids, digests = t.column("id").to_numpy().astype(np.int64), t.column("digest").to_numpy()
            if len(ids) != self.manifest.data.n:
                raise StorageError(f"{self.root.join(ROW_DIGESTS).uri}: {len(ids)} rows, the manifest says "
                                   f"{self.manifest.data.n}")
            self._digests = (ids, digests)
        return self._digests

    def _kept_rows(self, src: Location, ids: np.ndarray) -> np.ndarray:
        """(k,) positions among the training rows of the rows ``ids`` read from ``src``: they must be
        the recorded ids in their order, with only rows this cache removed left out; else an
        :class:`InputError` naming the first id that is not."""
        rec = self._row_digests()[0]
        order = np.argsort(rec, kind="stable")
        at = np.minimum(np.searchsorted(rec[order], ids), len(rec) - 1)
        pos = order[at]
        unknown = np.nonzero(rec[pos] != ids)[0]
        if len(unknown):
            i = int(unknown[0])
            raise InputError(f"{self._not_the_data(src)}: row {i} (id {int(ids[i])}) is not a row the cache was "
                             "trained on (an added row); only rows the cache erased may be left out, nothing added")
        back = np.nonzero(np.diff(pos) <= 0)[0]
        if len(back):
            i = int(back[0]) + 1
            what = "appears twice" if pos[i] == pos[i - 1] else "is out of the original order"
            raise InputError(f"{self._not_the_data(src)}: row {i} (id {int(ids[i])}) {what} (the cache was trained "
                             f"on it as row {int(pos[i])}); the data set must keep the original rows in their order")
        left = np.ones(len(rec), dtype=bool)
        left[pos] = False
        mask = self.removed_mask()
        removed = np.zeros(len(rec), dtype=bool) if mask is None else mask.numpy()[:len(rec)]
        wrong = np.nonzero(left & ~removed)[0]
        if len(wrong):
            raise InputError(f"{self._not_the_data(src)}: id {int(rec[wrong[0]])} is missing ({len(wrong)} id(s) in "
                             "all) but was not erased by the cache; only rows the cache erased may be left out")
        return pos

    def _not_the_data(self, src: Location) -> str:
        return (f"{src.uri} is not the data set the cache {self.uri} was trained on, nor that set without rows the "
                "cache erased")

    def _with_placeholders(self, data: Dataset, keep: np.ndarray) -> Dataset:
        """The training rows, ``data`` at positions ``keep`` and placeholders (recorded id, zero
        features, label 0) for the removed rows left out: they never enter a gradient."""
        ids = self._row_digests()[0]
        if len(keep) == len(ids):
            return data
        at = torch.from_numpy(keep)
        X = torch.zeros(len(ids), data.n_features, dtype=data.X.dtype)
        y = torch.zeros(len(ids), dtype=data.y.dtype)
        X[at], y[at] = data.X, data.y
        return Dataset(X, y, torch.from_numpy(ids.copy()))

    def added_rows(self) -> Dataset | None:
        """The rows added by the unlearning runs that produced this cache (None: none)."""
        raw = self._row_file("added.parquet")
        if raw is None:
            return None
        return dataset_from_table(parquet_table(raw), self.root.join("added.parquet").uri,
                                  self.spec.task == "regression")

    def row_ids(self, uri: str | Location | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, removed) of the cache's rows, reading the data's id column alone: ids (n,) int64 in
        row order, removed (n,) bool (rows erased by the changes that produced this cache)."""
        from .datasets import read_id_column
        src = self.data_location(uri)
        ids = read_id_column(src)
        recorded = self._row_digests()
        if recorded is not None and not np.array_equal(ids, recorded[0]):  # rewritten without erased rows?
            self._kept_rows(src, ids)
            ids = recorded[0].copy()
        extra = self.added_rows()
        if extra is not None:
            ids = np.concatenate([ids, extra.ids.numpy()])
        self._check_covers(len(ids))
        mask = self.removed_mask()
        return ids, (np.zeros(len(ids), dtype=bool) if mask is None else mask.numpy())

    def _check_covers(self, rows: int) -> None:
        if rows != self.n_rows:
            raise StorageError(f"{self.uri}: the cache covers {self.n_rows} rows, its data has {rows}")


def labels_only(cache: Cache, uri: str | Location | None = None) -> Dataset:
    """The cache's rows with ids and labels but zero-width features: what a replay needs when
    the features live elsewhere (data-parallel mode). The data is not re-verified here: the
    shards holding the features verify it. A data set rewritten without rows the cache erased
    (see :meth:`Cache.data`) gets placeholders (label 0) for them, after its ids are checked."""
    from .datasets import read_labels
    src = cache.data_location(uri)
    ids, y = read_labels(src)
    recorded = cache._row_digests()
    if recorded is not None and not np.array_equal(ids.numpy(), recorded[0]):
        keep = torch.from_numpy(cache._kept_rows(src, ids.numpy()))
        full = torch.zeros(len(recorded[0]), dtype=y.dtype)
        full[keep] = y
        ids, y = torch.from_numpy(recorded[0].copy()), full
    extra = cache.added_rows()
    if extra is not None:
        ids, y = torch.cat([ids, extra.ids]), torch.cat([y.to(extra.y.dtype), extra.y])
    cache._check_covers(len(ids))
    # as Cache.data: regression targets through float64 to the cache's dtype, classes as int64
    y = y.to(torch.float64).to(cache.dtype) if cache.spec.task == "regression" else y.to(torch.int64)
    return Dataset(torch.zeros(len(ids), 0, dtype=cache.dtype), y, ids)


def read_manifest(root: Location) -> Manifest:
    """The typed manifest of the cache at ``root``; a location without one is a clear error."""
    mloc = root.join(MANIFEST)
    if not mloc.exists():
        root.check_bucket()
        if root.is_file() or (root.is_dir() and any(p.name.endswith(".parquet") and p.name not in ROW_FILES
                                                    for p in root.list())):
            raise InputError(f"{root.uri} is not a trajectory cache (no {MANIFEST}); is it a data set?")
        raise StorageError(f"{root.uri}: no trajectory cache here (no committed {MANIFEST})")
    return Manifest.from_json(mloc.read_text(), mloc.uri)


def open_cache(uri: str | Location) -> Cache:
    """Open a committed cache (reads only the manifest)."""
    root = location(uri)
    return Cache(root, read_manifest(root))
