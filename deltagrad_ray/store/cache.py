"""The trajectory cache: Parquet shards of per-step vectors, plus a JSON manifest written last.

This module reads a cache (:class:`Cache`, :func:`open_cache`); :mod:`.cache_writer` writes one
(:class:`~.cache_writer.CacheWriter`); :mod:`.cache_format` holds the names and the codec both use.

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

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..core.data import Dataset, concat
from ..core.errors import InputError
from ..core.trajectory import Trajectory
from .cache_format import TORCH_DTYPES, MANIFEST, ROW_DIGESTS, ROW_FILES, ParquetSource, read_verified
from .datasets import (FEATURE_COPY, dataset_from_table, fingerprint, numpy_column, parquet_table, read_dataset,
                       read_ids_labels, read_rows, row_digests)
from .location import Location, StorageError, location, recorded_location
from .manifest import Manifest
from .models import parse_model


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
        self.dtype = TORCH_DTYPES[t.dtype]
        self.storage = TORCH_DTYPES[manifest.storage_dtype]
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
        rows = torch.from_numpy(numpy_column(parquet_table(raw).column("row")).astype(np.int64, copy=False))
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
            ids, digests = numpy_column(t.column("id")).astype(np.int64, copy=False), numpy_column(t.column("digest"))
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
