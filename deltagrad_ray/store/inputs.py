"""Data in the forms users hold it, as the core's :class:`~deltagrad_ray.core.data.Dataset`.

Accepted everywhere data enters the library (``api.fit``, ``many.*``, the scikit-learn estimators):

* NumPy arrays (or anything ``numpy.asarray`` takes): features ``X`` (n, d) with labels ``y`` given apart;
* pandas DataFrames and pyarrow Tables;
* a Parquet location (a file, or a folder / S3 prefix of parts): a path, ``file:///…`` or ``s3://…``;
* a ``ray.data.Dataset`` (materialised on the driver: it must fit in this process's memory);
* a ``(X, y)`` or ``(X, y, ids)`` tuple, or a :class:`Dataset` (passed through, checked).

Tables (DataFrames, pyarrow Tables, Parquet, Ray Data) follow the project's layout: a ``label``
column (unless ``y`` is given), an optional ``id`` column (unless ``ids`` is given), and the features,
either as one ``features`` column (fixed-size lists, fixed-shape tensors, Ray Data tensors or lists of
equal length) or as every other column, each numeric. Ids default to the row numbers 0 … n−1.

Every problem is one line naming the column and the row: ``X: NaN in row 17, column 3 ('bmi')``.
Rows are counted from 0 in the order given; the id is added where ids were given.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from ..core.data import Dataset
from ..core.errors import InputError
from .datasets import numpy_column
from .location import Location

LABEL, ID, FEATURES = "label", "id", "features"


class Rows(NamedTuple):
    """Converted rows, before labels are mapped to class indices.

    Fields:
      X:       (n, d) float32 or float64 features
      y:       (n,) labels as given (numbers, strings, …), or None when there were none
      ids:     (n,) int64 ids
      columns: feature names, when the input named its columns one per feature; else None
      given_ids: whether ids came from the input (not row numbers)
    """

    X: np.ndarray
    y: np.ndarray | None
    ids: np.ndarray
    columns: list[str] | None
    given_ids: bool


def is_location(data: Any) -> bool:
    return isinstance(data, (str, os.PathLike, Location))


def is_ray_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("ray.data") and hasattr(data, "to_arrow_refs")


def is_pandas(data: Any) -> bool:
    return type(data).__module__.startswith("pandas") and hasattr(data, "columns")


def is_table(data: Any) -> bool:
    """A table in the project's layout (labels and ids as columns), not a bare feature array."""
    return isinstance(data, (pa.Table, Dataset)) or is_location(data) or is_ray_dataset(data)


def in_project_layout(data: Any, *, labels: bool = True) -> bool:
    """Whether a data location holds the project's layout (id, features, and label when ``labels``),
    so it is read in place rather than converted (only the first part's footer is read)."""
    from .datasets import column_names
    return {"id", "features", *(("label",) if labels else ())} <= set(column_names(data))


def has_labels(data: Any) -> bool:
    """Whether ``data`` carries labels: a (X, y) tuple, a Dataset, or a table with a ``label`` column."""
    if isinstance(data, Dataset):
        return True
    if isinstance(data, tuple):
        return len(data) >= 2 and data[1] is not None
    if is_location(data):
        from .datasets import column_names
        return LABEL in column_names(data)
    if is_ray_dataset(data):
        return LABEL in data.schema().names
    if isinstance(data, pa.Table) or is_pandas(data):
        return LABEL in [str(c) for c in (data.column_names if isinstance(data, pa.Table) else data.columns)]
    return False


# -- reading ------------------------------------------------------------------------------------
def read_rows(data: Any, y: Any = None, *, ids: Any = None, labels: bool = True, what: str = "data") -> Rows:
    """Features, labels and ids of ``data`` in any accepted form, checked (labels not yet mapped).

    Args:
      data: see the module docstring.
      y: labels given apart from the features (arrays); None to read the ``label`` column of a table.
      ids: ids given apart (default: an ``id`` column, else the row numbers).
      labels: whether labels are required (False for rows to predict: a missing ``label`` column is fine).
      what: how the data is named in messages ("data", "test set", "X").

    Returns:
      :class:`Rows`.
    """
    if isinstance(data, tuple) and not isinstance(data, Dataset):
        if not 2 <= len(data) <= 3:
            raise InputError(f"{what}: a tuple must be (X, y) or (X, y, ids), got {len(data)} items")
        if y is not None or (ids is not None and len(data) == 3):
            raise InputError(f"{what}: labels or ids given twice (in the tuple and as arguments)")
        data, y, *rest = data
        ids = rest[0] if rest else ids
    if isinstance(data, Dataset):
        if y is not None or ids is not None:
            raise InputError(f"{what}: a Dataset carries its labels and ids; do not pass y or ids with it")
        t = Rows(data.X.detach().cpu().numpy(), data.y.detach().cpu().numpy(), data.ids.detach().cpu().numpy(),
                 None, True)
    elif is_location(data):
        from .datasets import _read_table
        from .location import location
        loc = location(data)
        t = _from_arrow(_read_table(loc), y, ids, labels, what if what != "data" else loc.uri)
    elif is_ray_dataset(data):
        import ray
        refs = data.to_arrow_refs()
        tables = ray.get(refs) if refs else []
        if not tables:
            raise InputError(f"{what}: the Ray dataset has no rows")
        t = _from_arrow(pa.concat_tables(tables, promote_options="none"), y, ids, labels, what)
    elif isinstance(data, pa.Table):
        t = _from_arrow(data, y, ids, labels, what)
    elif is_pandas(data):
        t = _from_arrow(_pandas_table(data), y, ids, labels, what)
    else:
        if y is None and labels:
            raise InputError(f"{what}: features given as an array need labels y (or give a table with a "
                             f"'{LABEL}' column)")
        X = _feature_array(data, what)
        t = Rows(X, None if y is None else _labels_array(y, what), _ids(ids, len(X), what), None, ids is not None)
    _check_rows(t, what)
    return t


def _pandas_table(df: Any) -> pa.Table:
    """An Arrow table of a DataFrame, keeping NaN as NaN (pyarrow's own conversion makes it null)."""
    cols = {}
    for c in df.columns:
        s = df[c]
        cols[str(c)] = pa.array(s.to_numpy()) if s.dtype.kind == "f" else pa.Array.from_pandas(s)
    return pa.table(cols) if cols else pa.table({})


def _feature_array(X: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(X)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what}: features must be a 2-D array of numbers ({e})") from None
    if arr.ndim != 2:
        raise InputError(f"{what}: features must be a 2-D array (rows × columns), got shape {arr.shape}")
    return _numeric(arr, what, None)


def _numeric(arr: np.ndarray, what: str, columns: list[str] | None) -> np.ndarray:
    if arr.dtype.kind == "f" and arr.dtype.itemsize >= 4:
        return arr if arr.dtype.itemsize <= 8 else arr.astype(np.float64)
    if arr.dtype.kind in "iub" or (arr.dtype.kind == "f"):
        return arr.astype(np.float64)
    if arr.dtype.kind == "O":
        for j in range(arr.shape[1]):
            try:
                arr[:, j].astype(np.float64)
            except (TypeError, ValueError):
                for i, v in enumerate(arr[:, j]):
                    try:
                        float(v)
                    except (TypeError, ValueError):
                        raise InputError(f"{what}: {v!r} in row {i}, {_col(j, columns)} is not a number") from None
        return arr.astype(np.float64)
    raise InputError(f"{what}: features must be numbers, got {arr.dtype}")


def _labels_array(y: Any, what: str) -> np.ndarray:
    if is_pandas(y) and hasattr(y, "to_numpy"):
        y = y.to_numpy()
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise InputError(f"{what}: labels must be one value per row, got shape {arr.shape}")
    return arr


def _ids(ids: Any, n: int, what: str) -> np.ndarray:
    if ids is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(ids.cpu().numpy() if isinstance(ids, torch.Tensor) else ids)
    if arr.ndim != 1 or len(arr) != n:
        raise InputError(f"{what}: {len(arr.reshape(-1))} ids for {n} rows; expected one id per row")
    if arr.dtype.kind not in "iu":
        raise InputError(f"{what}: ids must be integers, got {arr.dtype}")
    return arr.astype(np.int64)


def _col(j: int, columns: list[str] | None) -> str:
    return f"column {j} ({columns[j]!r})" if columns is not None else f"column {j}"


def _row(i: int, ids: np.ndarray, given: bool) -> str:
    return _where(i, ids if given else None)


def _where(i: int, ids: np.ndarray | None) -> str:
    """Row i, with its id when the ids are not the row numbers."""
    return f"row {i} (id {int(ids[i])})" if ids is not None else f"row {i}"


def _from_arrow(table: pa.Table, y: Any, ids: Any, labels: bool, what: str) -> Rows:
    names = table.column_names
    if y is not None and LABEL in names:
        raise InputError(f"{what}: labels given twice: as y and as column '{LABEL}'")
    if ids is not None and ID in names:
        raise InputError(f"{what}: ids given twice: as ids and as column '{ID}'")
    n = table.num_rows
    if ID in names:
        col = table.column(ID)
        if col.null_count:
            raise InputError(f"{what}: column '{ID}' is empty in row {_first_null(col)}")
        id_arr = numpy_column(col)
        if id_arr.dtype.kind not in "iu":
            raise InputError(f"{what}: column '{ID}' must be integers, got {col.type}")
        id_arr, given = id_arr.astype(np.int64), True
    else:
        id_arr, given = _ids(ids, n, what), ids is not None
    if y is not None:
        lab = _labels_array(y, what)
    elif LABEL in names:
        col = table.column(LABEL)
        if col.null_count:
            raise InputError(f"{what}: column '{LABEL}' is empty in {_row(_first_null(col), id_arr, given)}")
        lab = col.to_numpy(zero_copy_only=False)
    elif labels:
        raise InputError(f"{what}: no '{LABEL}' column (columns: {', '.join(names) or 'none'}); "
                         "give the labels as a column or as y")
    else:
        lab = None
    feats = [c for c in names if c not in (LABEL, ID)]
    if not feats:
        raise InputError(f"{what}: no feature columns (columns: {', '.join(names) or 'none'})")
    if FEATURES in feats or (len(feats) == 1 and not _is_scalar_type(table.column(feats[0]).type)):
        name = FEATURES if FEATURES in feats else feats[0]
        if len(feats) > 1:
            others = ", ".join(c for c in feats if c != name)
            raise InputError(f"{what}: a '{FEATURES}' column and other columns ({others}); "
                             f"expected either one '{FEATURES}' column or one column per feature")
        X, columns = _vector_column(table.column(name), name, what, id_arr, given), None
    else:
        cols = []
        for j, c in enumerate(feats):
            col = table.column(c)
            if not _is_scalar_type(col.type) or not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
                                                     or pa.types.is_boolean(col.type) or pa.types.is_decimal(col.type)):
                raise InputError(f"{what}: column {j} ({c!r}) must hold numbers, got {col.type}")
            if col.null_count:
                raise InputError(f"{what}: empty value in {_row(_first_null(col), id_arr, given)}, column {j} ({c!r})")
            cols.append(col.to_numpy(zero_copy_only=False))
        kinds = {a.dtype for a in cols}
        dt = np.float32 if kinds == {np.dtype(np.float32)} else np.float64
        X = np.empty((n, len(cols)), dtype=dt)
        for j, a in enumerate(cols):
            X[:, j] = a
        columns = [str(c) for c in feats]
    return Rows(X, lab, id_arr, columns, given)


def _is_scalar_type(t: pa.DataType) -> bool:
    return not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
                or isinstance(t, pa.ExtensionType))


def _first_null(col: pa.ChunkedArray) -> int:
    return int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])


def _vector_column(col: pa.ChunkedArray, name: str, what: str, ids: np.ndarray, given: bool) -> np.ndarray:
    """(n, d) floats from a column of vectors: fixed-size lists, tensors (pyarrow's or Ray Data's), lists."""
    arr = col.combine_chunks()
    if arr.null_count:
        raise InputError(f"{what}: column '{name}' is empty in {_row(_first_null(col), ids, given)}")
    if isinstance(arr.type, pa.FixedShapeTensorType):
        X = arr.to_numpy_ndarray()
    elif isinstance(arr.type, pa.ExtensionType):   # e.g. Ray Data's ArrowTensorType
        X = np.asarray(arr.to_numpy(zero_copy_only=False))
        if X.dtype == object:
            X = _stack(list(X), name, what, ids, given)
    elif pa.types.is_fixed_size_list(arr.type):
        X = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
    else:
        X = _stack(arr.to_pylist(), name, what, ids, given)
    X = X.reshape(len(arr), -1) if X.ndim != 2 else X
    if X.dtype.kind not in "fiub":
        raise InputError(f"{what}: column '{name}' must hold numbers, got {arr.type}")
    return X if X.dtype in (np.float32, np.float64) else X.astype(np.float64)


def _stack(rows: list, name: str, what: str, ids: np.ndarray, given: bool) -> np.ndarray:
    width = None
    for i, r in enumerate(rows):
        k = len(r)
        if width is None:
            width = k
        elif k != width:
            raise InputError(f"{what}: column '{name}' has {k} values in {_row(i, ids, given)}, "
                             f"expected {width} (the length in row 0)")
    try:
        return np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{what}: column '{name}' must hold lists of numbers") from None


def _check_rows(t: Rows, what: str) -> None:
    X, y, ids = t.X, t.y, t.ids
    n = X.shape[0]
    if n == 0:
        raise InputError(f"{what}: no rows")
    if X.shape[1] == 0:
        raise InputError(f"{what}: rows have no features")
    if y is not None and len(y) != n:
        raise InputError(f"{what}: {len(y)} labels for {n} rows; expected one label per row")
    if len(ids) != n:
        raise InputError(f"{what}: {len(ids)} ids for {n} rows; expected one id per row")
    check_finite(X, what, t.columns, ids if t.given_ids else None)
    if y is not None and y.dtype.kind == "f" and not np.isfinite(y).all():
        i = int(np.flatnonzero(~np.isfinite(y))[0])
        raise InputError(f"{what}: label {_name(y[i])} in {_row(i, ids, t.given_ids)}; labels must be finite")
    if n > 1:
        order = np.argsort(ids, kind="stable")
        s = ids[order]
        dup = np.flatnonzero(s[1:] == s[:-1])
        if len(dup):
            a, b = sorted((int(order[dup[0]]), int(order[dup[0] + 1])))
            raise InputError(f"{what}: duplicate id {int(s[dup[0]])} in rows {a} and {b}; ids must be unique")


def _name(v: float) -> str:
    return "NaN" if np.isnan(v) else ("inf" if v > 0 else "-inf")


def check_finite(X: np.ndarray, what: str, columns: list[str] | None = None, ids: np.ndarray | None = None) -> None:
    """Raise one line naming the first row and column holding NaN or inf (and how many rows do)."""
    if X.dtype.kind != "f":
        return
    ok = np.isfinite(X)
    if ok.all():
        return
    bad_rows = np.flatnonzero(~ok.all(axis=1))
    i = int(bad_rows[0])
    j = int(np.flatnonzero(~ok[i])[0])
    more = f"; {len(bad_rows)} rows have NaN or inf" if len(bad_rows) > 1 else ""
    raise InputError(f"{what}: {_name(X[i, j])} in {_where(i, ids)}, {_col(j, columns)}{more}")


# -- the core's Dataset -------------------------------------------------------------------------
def labels_as_classes(y: np.ndarray, n_classes: int | None, what: str, ids: np.ndarray | None = None) -> np.ndarray:
    """Class indices (int64) from integer labels (or integral floats), checked against [0, n_classes)."""
    if y.dtype.kind == "f":
        frac = np.flatnonzero(np.mod(y, 1) != 0)
        if len(frac):
            i = int(frac[0])
            raise InputError(f"{what}: label {float(y[i])!r} in {_where(i, ids)} is not a class index; "
                             "class labels must be integers 0 … c−1")
    elif y.dtype.kind not in "iub":
        raise InputError(f"{what}: class labels must be integers 0 … c−1, got {y.dtype} "
                         "(the scikit-learn estimators map labels of any type)")
    cls = y.astype(np.int64)
    hi = n_classes if n_classes is not None else None
    bad = np.flatnonzero((cls < 0) | ((cls >= hi) if hi is not None else False))
    if len(bad):
        i = int(bad[0])
        rng = f"[0, {hi})" if hi is not None else "0 or more"
        raise InputError(f"{what}: label {int(cls[i])} in {_where(i, ids)} is out of range {rng}")
    return cls


def as_dataset(data: Any, y: Any = None, *, ids: Any = None, task: str = "classification",
               n_classes: int | None = None, labels: bool = True, what: str = "data") -> Dataset:
    """The core's :class:`Dataset` of ``data`` in any accepted form (see the module docstring).

    Args:
      data: arrays, a DataFrame, a pyarrow Table, a Parquet location, a ``ray.data.Dataset``, a tuple
        ``(X, y[, ids])`` or a :class:`Dataset`.
      y: labels given apart (with arrays); default: the ``label`` column.
      ids: ids given apart; default: the ``id`` column, else the row numbers.
      task: ``"classification"`` (labels: class indices 0 … c−1) or ``"regression"`` (float targets).
      n_classes: c, to check labels against (classification).
      labels: False for rows to predict (missing labels become 0).
      what: how the data is named in messages.

    Returns:
      A :class:`Dataset`: features float64 (float32 when given so), labels int64 or float64, ids int64.

    Example:
      >>> import numpy as np
      >>> ds = as_dataset(np.eye(3), [0, 1, 1])
      >>> ds.ids.tolist(), ds.y.tolist()
      ([0, 1, 2], [0, 1, 1])
    """
    if task not in ("classification", "regression"):
        raise InputError(f"task must be classification or regression, got {task!r}")
    t = read_rows(data, y, ids=ids, labels=labels, what=what)
    ids_shown = t.ids if t.given_ids else None
    if t.y is None:
        lab = np.zeros(len(t.X), dtype=np.float64 if task == "regression" else np.int64)
    elif task == "regression":
        if t.y.dtype.kind not in "iuf":
            raise InputError(f"{what}: regression targets must be numbers, got {t.y.dtype}")
        lab = t.y.astype(np.float64)
    else:
        lab = labels_as_classes(t.y, n_classes, what, ids_shown)
    # copies: the Dataset must not change when the caller's arrays do (a cache or a fitted estimator keeps it)
    return Dataset(torch.from_numpy(np.array(t.X, order="C", copy=True)), torch.from_numpy(np.array(lab, copy=True)),
                   torch.from_numpy(np.array(t.ids, dtype=np.int64, copy=True)))
