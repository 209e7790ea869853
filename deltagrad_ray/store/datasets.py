"""Data sets and id lists on storage.

A data set is a Parquet file, or a directory/prefix of Parquet files read in name order, with
columns ``id`` (int64, unique), ``label`` (integer class, or float target) and ``features``
(fixed-size list of floats, or a fixed-shape tensor). An id list is a text file with one id
per line, or a Parquet file with an ``id`` column.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..core.data import Dataset
from ..core.errors import InputError
from .location import Location, StorageError, location


def _parquet_parts(loc: Location) -> list[Location]:
    if loc.is_file():
        return [loc]
    if loc.join("manifest.json").exists():  # a cache holds Parquet files of its own (rows, removed, added)
        raise InputError(f"{loc.uri} is a trajectory cache, not a data set")
    parts = [p for p in loc.list() if p.name.endswith(".parquet") and not p.name.startswith(".")]
    if not parts:
        raise StorageError(f"{loc.uri}: no data set here (no Parquet file)")
    return parts


def parquet_table(buf: pa.Buffer, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file held in an Arrow buffer, as a table (through ``ParquetFile``, not
    ``read_table``: one file needs no pyarrow.dataset, whose import costs 0.25 s at start-up)."""
    return pq.ParquetFile(pa.BufferReader(buf)).read(columns=columns)


def arrow_array(values: np.ndarray | torch.Tensor) -> pa.Array:
    """A 1-D array of numbers (NumPy, or a tensor) as an Arrow array over its buffer, without a copy
    for a contiguous one: ``pa.array`` imports pandas on its first call (see :func:`numpy_column`).
    Anything else goes through ``pa.array``."""
    a = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    if isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype.kind in "iuf" and a.dtype.isnative:
        a = np.ascontiguousarray(a)
        return pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype), len(a), [None, pa.py_buffer(a)])
    return pa.array(a)


def _values(arr: pa.Array) -> np.ndarray:
    """The values of one Arrow array as NumPy, read-only: for fixed-width numbers without nulls a view
    of its data buffer (offset-aware; pyarrow's ``to_numpy`` imports pandas on its first call, 0.1-0.3 s
    of every job's start-up, measured, and nothing on a job's path needs pandas), else ``to_numpy``."""
    t = arr.type
    if arr.null_count or not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        return arr.to_numpy(zero_copy_only=False)
    return np.frombuffer(arr.buffers()[1], dtype=t.to_pandas_dtype(), count=arr.offset + len(arr))[arr.offset:]


def numpy_column(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A column as a new writable NumPy array, its chunks copied once (see :func:`_values`)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    parts = [_values(c) for c in chunks]
    return np.concatenate(parts) if parts else np.array(col.to_numpy() if isinstance(col, pa.ChunkedArray)
                                                        else col.to_numpy(zero_copy_only=False))


def parquet_rows(buf) -> list[dict]:
    """The rows of one Parquet file held in an Arrow buffer, as dicts.

    Raises:
      ValueError: "not a readable Parquet file (…)", with Arrow's first line of reason.
    """
    try:
        return parquet_table(buf).to_pylist()
    except (pa.ArrowException, OSError, ValueError, OverflowError) as e:
        raise ValueError(f"not a readable Parquet file ({str(e).splitlines()[0][:100]})") from None


def _read_table(loc: Location, columns: list[str] | None = None) -> pa.Table:
    """Every Parquet part of ``loc`` (only ``columns``, if given) as one table."""
    tables = []
    for part in _parquet_parts(loc):
        try:
            # an Arrow-owned buffer, not Python bytes: pyarrow's worker threads release the scan's
            # source after read_table returns, and a Python-owned one needs the GIL to be freed, which
            # a thread cannot take once the interpreter is finalizing: it then aborts the process
            # ("terminate called without an active exception", exit 134; see deltagrad_ray/runtime.py)
            tables.append(parquet_table(part.read_buffer(), columns))
        except (pa.ArrowInvalid, OSError) as e:
            raise StorageError(f"{part.uri}: not a readable Parquet file ({e})") from None
    try:
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as e:
        raise InputError(f"{loc.uri}: the Parquet parts have different schemas ({e})") from None


def _features(col: pa.ChunkedArray, uri: str) -> np.ndarray:
    """The features as a writable (n, d) C-contiguous array: one copy out of Arrow's chunks (Arrow's
    memory is read-only, and torch tensors over it would be too)."""
    if isinstance(col.type, pa.FixedShapeTensorType):
        return np.array(col.combine_chunks().to_numpy_ndarray().reshape(len(col), -1), copy=True, order="C")
    if not pa.types.is_fixed_size_list(col.type):
        raise InputError(f"{uri}: column 'features' must be a fixed-size list or fixed-shape tensor "
                         f"of floats, got {col.type}")
    if col.null_count:
        raise InputError(f"{uri}: column 'features' has {col.null_count} null rows")
    value_type = col.type.value_type
    if not pa.types.is_floating(value_type):
        raise InputError(f"{uri}: features must be floats, got {value_type}")
    width = col.type.list_size
    out = np.empty((len(col), width), dtype=value_type.to_pandas_dtype())
    row = 0
    for chunk in col.chunks:  # a chunk's values: its slice of the child array (offset-aware flatten)
        k = len(chunk)
        out[row:row + k] = _values(chunk.flatten()).reshape(k, width)
        row += k
    return out


def read_dataset(uri: str | Location, *, regression: bool | None = None, labels_optional: bool = False) -> Dataset:
    """Read a data set. Labels become int64 (classification) or float64 (regression).

    Args:
      regression: force float targets (True) or integer classes (False); by default from the
        label column's type.
      labels_optional: accept a data set without a ``label`` column (labels then read as 0),
        e.g. test points to predict.
    """
    loc = location(uri)
    table = _read_table(loc)
    if table.num_rows == 0:
        raise InputError(f"{loc.uri}: no rows (an empty data set)")
    if labels_optional and "label" not in table.column_names:
        zeros = np.zeros(table.num_rows, dtype=np.float64 if regression else np.int64)
        table = table.append_column("label", pa.array(zeros))
    return dataset_from_table(table, loc.uri, regression)


def read_labels(uri: str | Location) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) of a data set, without reading its features (labels as stored: int or float)."""
    t = _read_table(location(uri), ["id", "label"])
    # copies: Arrow's memory is read-only, and tensors over it would be too
    ids, labels = numpy_column(t.column("id")).astype(np.int64, copy=False), numpy_column(t.column("label"))
    return torch.from_numpy(ids), torch.from_numpy(labels)


def read_id_column(uri: str | Location) -> np.ndarray:
    """The ``id`` column of a data set alone (int64; no label, no features read)."""
    loc = location(uri)
    t = _read_table(loc, ["id"])
    col = t.column("id")
    if col.null_count or not pa.types.is_integer(col.type):
        raise InputError(f"{loc.uri}: column 'id' must be non-null integers, got {col.type}")
    return numpy_column(col).astype(np.int64, copy=False)


FEATURE_COPY = "features.npy"  # inside a local cache: the training features, memory-mappable


def feature_copy(cache_root: Location) -> Location:
    """Where a cache's memory-mappable feature copy goes; refused for a cache that is not local."""
    if not cache_root.is_local:
        raise InputError(f"{cache_root.uri}: --mmap-features needs a local cache (S3 objects cannot be memory-mapped)")
    return cache_root.join(FEATURE_COPY)


def write_feature_copy(X: torch.Tensor, loc: Location) -> None:
    """The features as one ``.npy`` file at a local ``loc`` (:func:`feature_copy`; written to a
    temporary name, then renamed), which :func:`read_dataset_mapped` maps instead of decoding Parquet."""
    os.makedirs(os.path.dirname(loc.path), exist_ok=True)
    tmp = f"{loc.path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(X.detach().cpu().numpy()), allow_pickle=False)
        os.replace(tmp, loc.path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_ids_labels(uri: str | Location, *, regression: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked (ids, labels) of a data set, as :func:`read_dataset` makes them, without its features."""
    loc = location(uri)
    return _ids_labels(_read_table(loc, ["id", "label"]), loc.uri, regression)


def read_dataset_mapped(uri: str | Location, copy: Location, *, regression: bool | None = None) -> Dataset:
    """The data set at ``uri`` with its features mapped from the ``.npy`` copy (no Parquet decoding,
    no copy: pages are read when touched, private to this process). Only ids and labels are read
    from ``uri``; the caller verifies the result's fingerprint (a stale copy does not match)."""
    X = np.load(copy.path, mmap_mode="c", allow_pickle=False)
    ids_t, y = read_ids_labels(uri, regression=regression)
    if X.ndim != 2 or X.shape[0] != len(ids_t):
        raise InputError(f"{copy.uri}: features of shape {X.shape}, expected ({len(ids_t)}, d)")
    return Dataset(torch.from_numpy(X), y, ids_t)


def column_names(uri: str | Location) -> list[str]:
    """The columns of a data set (from its first Parquet part's footer)."""
    part = _parquet_parts(location(uri))[0]
    with part.open_random_access() as fh:  # the footer only, not the file
        return pq.ParquetFile(fh).schema_arrow.names


def _require(names: list[str], uri: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{uri}: missing column(s) {missing}; expected id, label, features")


def _ids_labels(table: pa.Table, uri: str, regression: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked ids (int64) and labels (int64 classes or float64 targets) of a table."""
    if table.column("id").null_count:
        raise InputError(f"{uri}: column 'id' has null values")
    ids = numpy_column(table.column("id"))
    if ids.dtype.kind not in "iu":
        raise InputError(f"{uri}: column 'id' must be integers, got {table.column('id').type}")
    labels = table.column("label")
    if labels.null_count:
        raise InputError(f"{uri}: column 'label' has {labels.null_count} null values")
    y = numpy_column(labels)
    if y.dtype.kind not in "iuf":
        raise InputError(f"{uri}: column 'label' must be numbers, got {labels.type}")
    is_float = y.dtype.kind == "f"
    if regression is None:
        regression = is_float
    if not regression:
        if is_float and not np.all(np.mod(y[np.isfinite(y)], 1) == 0):
            raise InputError(f"{uri}: class labels must be integers, got non-integer floats")
        y_t = torch.from_numpy(np.nan_to_num(y).astype(np.int64))
    else:
        y_t = torch.from_numpy(y.astype(np.float64))
    return torch.from_numpy(ids.astype(np.int64)), y_t


def dataset_from_table(table: pa.Table, uri: str, regression: bool | None = None) -> Dataset:
    _require(table.column_names, uri, ("id", "label", "features"))
    ids, y = _ids_labels(table, uri, regression)
    X = _features(table.column("features"), uri)
    return Dataset(torch.from_numpy(X), y, ids)


def read_rows(uri: str | Location, start: int, stop: int, *, regression: bool) -> tuple[Dataset, int, str]:
    """Rows [start, min(stop, n)) of a data set of n rows, with n and the set's :func:`fingerprint`
    (the caller checks both: a wrong data set is named by its fingerprint), holding no
    more than those rows and one row group of features at a time (a data shard of a set too big
    for one process): ids and labels are read first, then the features a row group at a time,
    each hashed and dropped unless in range. Same values as ``read_dataset(uri).rows(...)``."""
    loc = location(uri)
    files = [pq.ParquetFile(part.open_random_access()) for part in _parquet_parts(loc)]
    head = pa.concat_tables([f.read(columns=["id", "label"]) for f in files])
    _require(head.column_names, loc.uri, ("id", "label"))
    ids, y = _ids_labels(head, loc.uri, regression)
    n = len(ids)
    if not 0 <= start <= stop:
        raise InputError(f"rows [{start}, {stop}): expected 0 <= start <= stop")
    start, stop = min(start, n), min(stop, n)
    h = hashlib.sha256()
    for t in (ids, y):
        _hash_array(h, t.numpy())
    keep, row, width = [], 0, None
    for f in files:
        _require(f.schema_arrow.names, loc.uri, ("features",))
        for g in range(f.num_row_groups):
            X = _features(f.read_row_group(g, columns=["features"]).column("features"), loc.uri)
            if width is None:
                width = X.shape[1]
                h.update(f"{X.dtype.str}{(n, width)}".encode())   # the header _hash_array writes for all of X
            h.update(X.data)
            a, b = max(start - row, 0), min(stop - row, len(X))
            if a < b:
                keep.append(X[a:b].copy())
            row += len(X)
    X = np.concatenate(keep) if keep else np.empty((0, width or 0))
    return Dataset(torch.from_numpy(X), y[start:stop].clone(), ids[start:stop].clone()), n, "sha256:" + h.hexdigest()


def dataset_table(data: Dataset) -> pa.Table:
    X = data.X.detach().cpu().numpy()
    feats = pa.FixedSizeListArray.from_arrays(arrow_array(X.reshape(-1)), X.shape[1])
    return pa.table({"id": arrow_array(data.ids), "label": arrow_array(data.y), "features": feats})


def table_bytes(table: pa.Table, **kwargs) -> pa.Buffer:
    """The Parquet encoding of ``table``, as one Arrow buffer (no intermediate copies)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue()


def write_dataset(data: Dataset, uri: str | Location, *, overwrite: bool = False,
                  row_group_bytes: int = 64 << 20) -> Location:
    """Write a data set as one Parquet file (a ``.parquet`` path) or ``part-0.parquet`` under a prefix,
    in row groups of about ``row_group_bytes`` of features (what :func:`read_rows` holds at a time)."""
    loc = location(uri)
    target = loc if loc.name.endswith(".parquet") else loc.join("part-0.parquet")
    row_bytes = max(1, data.X.shape[1] * data.X.element_size())
    target.write_bytes(table_bytes(dataset_table(data), row_group_size=max(1, row_group_bytes // row_bytes)),
                       overwrite=overwrite)
    return target


def fingerprint(data: Dataset) -> str:
    """sha256 over ids, labels and features (row order, dtypes and shape included)."""
    h = hashlib.sha256()
    for t in (data.ids, data.y, data.X):
        _hash_array(h, t.detach().cpu().numpy())
    return "sha256:" + h.hexdigest()


DIGEST_ROWS = 1 << 16  # rows hashed per block by row_digests (bounds the temporary copy)


def row_digests(data: Dataset) -> np.ndarray:
    """(n,) uint64: each row's 8-byte blake2b over its id, label and features, as the bytes
    :func:`fingerprint` hashes them (the dtypes, and the width, key the hash). A data set rewritten
    without some rows is checked row by row against these (see ``Cache``)."""
    ids, y, X = (np.ascontiguousarray(t.detach().cpu().numpy()) for t in (data.ids, data.y, data.X))
    n = len(ids)
    key = f"{ids.dtype.str}{y.dtype.str}{X.dtype.str}{X.shape[1:]}".encode()
    out = np.empty(n, dtype="<u8")
    for a in range(0, n, DIGEST_ROWS):
        b = min(n, a + DIGEST_ROWS)
        block = np.concatenate([t[a:b].reshape(b - a, -1).view(np.uint8) for t in (ids, y, X)], axis=1)
        width, mv = block.shape[1], memoryview(block.reshape(-1))
        out[a:b] = np.frombuffer(b"".join(hashlib.blake2b(mv[i * width:(i + 1) * width], digest_size=8,
                                                          key=key).digest() for i in range(b - a)), dtype="<u8")
    return out


def _hash_array(h, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)


_INT64 = (-(2**63), 2**63 - 1)
_ID = re.compile(r"[+-]?[0-9]+")


def id_tensor(values, what: str = "ids") -> torch.Tensor:
    """Ids given in memory (a list, an array, a tensor) as an int64 tensor, checked: integers only
    (no floats, no booleans), each within int64.

    Args:
      values: the ids.
      what: how they are named in messages.

    Returns:
      (n,) int64 tensor.
    """
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise InputError(f"{what} must be integers, got a tensor of {values.dtype}")
        return values.to(torch.int64).reshape(-1)
    arr = np.asarray(values)
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _INT64[1]:
        raise InputError(f"{what}: id {int(arr.max())} is beyond int64 (ids are int64)")
    if arr.dtype.kind in "iu":
        return torch.from_numpy(arr.astype(np.int64).reshape(-1))
    if arr.size == 0:
        return torch.zeros(0, dtype=torch.int64)
    out = []
    for v in arr.reshape(-1).tolist():
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputError(f"{what} must be integers, got {v!r}")
        if not _INT64[0] <= v <= _INT64[1]:
            raise InputError(f"{what}: id {v} is beyond int64 (ids are int64)")
        out.append(v)
    return torch.tensor(out, dtype=torch.int64)


def read_ids(uri: str | Location) -> torch.Tensor:
    """Ids from a text file (one per line: an optional sign and ASCII digits; blank lines and #
    comments ignored) or a Parquet file with an ``id`` column. Every id must fit int64, and the
    file must hold at least one (an empty request is refused, not taken as "change nothing")."""
    loc = location(uri)
    raw = loc.read_buffer()  # Arrow-owned (see _read_table)
    if raw.slice(0, min(4, raw.size)).to_pybytes() == b"PAR1":
        try:
            table = parquet_table(raw)
        except (pa.ArrowInvalid, OSError) as e:
            raise StorageError(f"{loc.uri}: not a readable Parquet file ({e})") from None
        if "id" not in table.column_names:
            raise InputError(f"{loc.uri}: Parquet id list needs an 'id' column, has {table.column_names}")
        col = table.column("id")
        if col.null_count or not pa.types.is_integer(col.type):
            raise InputError(f"{loc.uri}: column 'id' must be non-null integers, got {col.type}")
        ids = id_tensor(numpy_column(col), f"{loc.uri}")
    else:
        values = []
        for lineno, line in enumerate(raw.to_pybytes().decode("utf-8", errors="replace").splitlines(), 1):
            s = line.split("#", 1)[0].strip()
            if not s:
                continue
            if not _ID.fullmatch(s):  # int() would also take "1_4" (as 14), " ١٤" and other forms
                raise InputError(f"{loc.uri}, line {lineno}: {s!r} is not an integer id")
            v = int(s)
            if not _INT64[0] <= v <= _INT64[1]:
                raise InputError(f"{loc.uri}, line {lineno}: id {s} is beyond int64 (ids are int64)")
            values.append(v)
        ids = torch.tensor(values, dtype=torch.int64)
    if len(ids) == 0:
        raise InputError(f"{loc.uri}: no ids in this file (an empty id list)")
    return ids
