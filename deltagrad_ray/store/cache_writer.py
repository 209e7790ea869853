"""Writing a trajectory cache: :class:`CacheWriter` records training (or a replay) shard by shard
as it runs and commits the manifest last; the row files of a derived cache (``rows.parquet``,
``removed.parquet``, ``added.parquet``). The layout is :mod:`.cache`'s; the codec :mod:`.cache_format`'s.
"""

from __future__ import annotations

import datetime as _dt
import math
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from ..core.data import Dataset
from ..core.errors import InputError
from ..core.models import FunctionalModel
from .cache_format import (TORCH_DTYPES, DEFAULT_SHARD_BYTES, MANIFEST, OVERLAP_MIN_BYTES, ParquetSource, dtype_name,
                           overlap_shard_steps, row_group_steps_for, sha256, shard_bytes, shard_steps_for,
                           storage_dtype)
from .datasets import arrow_array, dataset_table, row_digests, table_bytes
from .location import Location, StorageError
from .manifest import DataRef, FileRef, Manifest, ParentRef, ShardRef, Training
from .models import model_bytes


def row_digest_file(data: Dataset) -> pa.Buffer:
    """``rows.parquet`` of a cache trained on ``data`` (as read: the bytes the fingerprint hashes)."""
    return table_bytes(pa.table({"id": arrow_array(data.ids.cpu().numpy().astype(np.int64)),
                                 "digest": arrow_array(row_digests(data))}))


def removed_rows_file(rows: torch.Tensor, ids: torch.Tensor):
    """``removed.parquet`` of a derived cache: the rows deleted so far (``row``) and their ids (``id``),
    read back by :meth:`Cache.removed_mask`."""
    return table_bytes(pa.table({"row": arrow_array(rows), "id": arrow_array(ids)}))


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
      overlap: cap the shards at about 1/8 of the run (at least ~8 MB each) so they are written while
        it runs (:func:`~.cache_format.overlap_shard_steps`); default: when no shard size is given.
    """

    WRITERS = 2  # shards in flight (one writer thread reached 44% of the disk's raw write speed)

    def __init__(self, root: Location, training: Training, *, shard_steps: int | None = None,
                 shard_bytes: int | None = None, storage: str | torch.dtype | None = None,
                 row_group_steps: int | None = None, overlap: bool | None = None) -> None:
        check_new_cache(root)
        if shard_steps is not None and shard_steps < 1:
            raise InputError(f"shard steps must be >= 1, got {shard_steps}")
        if shard_bytes is not None and shard_bytes < 1:
            raise InputError(f"shard bytes must be >= 1, got {shard_bytes}")
        self.root, self.training = root, training
        self.p, self.dtype = training.model.build().p, TORCH_DTYPES[training.dtype]
        self.digest = training.digest()
        self.storage = storage_dtype(storage, self.dtype)
        self.lrs = training.learning_rates().numpy().astype(np.float64)
        self.steps = len(self.lrs)
        itemsize = torch.empty(0, dtype=self.storage).element_size()
        steps = shard_steps or shard_steps_for(self.p, itemsize, shard_bytes or DEFAULT_SHARD_BYTES)
        if overlap is None:  # the default: overlap unless a shard size was given
            overlap = shard_steps is None and shard_bytes is None
        if overlap:  # shards small enough to be written while the run goes on
            steps = overlap_shard_steps(self.steps, steps, shard_steps_for(self.p, itemsize, OVERLAP_MIN_BYTES))
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
            holders = [n for n in ("float32", "bfloat16") if torch.finfo(TORCH_DTYPES[n]).max >= top] or ["float64"]
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
