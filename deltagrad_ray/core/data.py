"""Data sets and change sets as plain tensors, with the validation users rely on."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .errors import InputError


class Dataset(NamedTuple):
    """Rows of a training or test set.

    Fields:
      X:   (n, d) features, float32 or float64
      y:   (n,) int64 class indices, or float targets for regression
      ids: (n,) int64 ids, unique
    """

    X: Tensor
    y: Tensor
    ids: Tensor

    def __len__(self) -> int:  # type: ignore[override]
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    def rows(self, index: Tensor) -> Dataset:
        return Dataset(self.X[index], self.y[index], self.ids[index])

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Dataset:
        """Features (and float targets) in ``dtype``, everything on ``device``."""
        ydt = (dtype or self.y.dtype) if self.y.is_floating_point() else self.y.dtype
        return Dataset(self.X.to(device=device, dtype=dtype or self.X.dtype),
                       self.y.to(device=device, dtype=ydt), self.ids.to(device=device))


def concat(a: Dataset, b: Dataset) -> Dataset:
    return Dataset(torch.cat([a.X, b.X]), torch.cat([a.y, b.y]), torch.cat([a.ids, b.ids]))


def _preview(values: Tensor, k: int = 5) -> str:
    vals = values.tolist()
    return ", ".join(str(v) for v in vals[:k]) + (f", … ({len(vals)} in all)" if len(vals) > k else "")


def validate(data: Dataset, *, n_features: int | None = None, n_classes: int | None = None,
             what: str = "data") -> None:
    """Raise :class:`InputError` unless ``data`` is well formed.

    Args:
      n_features: expected width d, if known.
      n_classes: c for classification (labels must be integers in [0, c)), None for regression.
      what: how the data is named in messages ("data", "added rows", "test set").
    """
    X, y, ids = data
    if X.ndim != 2:
        raise InputError(f"{what}: features must be a 2-D array (rows × d), got shape {tuple(X.shape)}")
    n = X.shape[0]
    if y.shape != (n,) or ids.shape != (n,):
        raise InputError(f"{what}: expected {n} labels and {n} ids, got {tuple(y.shape)} and {tuple(ids.shape)}")
    if n_features is not None and X.shape[1] != n_features:
        raise InputError(f"{what}: rows have {X.shape[1]} features, expected {n_features}")
    if not X.is_floating_point():
        raise InputError(f"{what}: features must be floats, got {X.dtype}")
    bad = ~torch.isfinite(X).all(dim=1)
    if bool(bad.any()):
        raise InputError(f"{what}: NaN or inf features in rows with id {_preview(ids[bad])}")
    if ids.dtype != torch.int64:
        raise InputError(f"{what}: ids must be int64, got {ids.dtype}")
    if n > 1:
        s = torch.sort(ids).values
        dup = s[1:][s[1:] == s[:-1]]
        if len(dup):
            raise InputError(f"{what}: duplicate ids {_preview(torch.unique(dup))}")
    if n_classes is None:
        if not y.is_floating_point():
            raise InputError(f"{what}: regression targets must be floats, got {y.dtype}")
        if not bool(torch.isfinite(y).all()):
            raise InputError(f"{what}: NaN or inf targets in rows with id {_preview(ids[~torch.isfinite(y)])}")
    else:
        if y.is_floating_point() or y.dtype == torch.bool:
            raise InputError(f"{what}: class labels must be integers in [0, {n_classes}), got {y.dtype}")
        out = (y < 0) | (y >= n_classes)
        if bool(out.any()):
            raise InputError(f"{what}: labels out of range [0, {n_classes}) in rows with id "
                             f"{_preview(ids[out])} (labels {_preview(torch.unique(y[out]))})")


def rows_of_ids(ids: Tensor, wanted: Tensor, *, what: str = "ids") -> Tensor:
    """Row positions of ``wanted`` ids in ``ids``; unknown or repeated ids are an error."""
    wanted = torch.as_tensor(wanted, dtype=torch.int64).reshape(-1)
    if len(wanted) > 1:
        s = torch.sort(wanted).values
        dup = s[1:][s[1:] == s[:-1]]
        if len(dup):
            raise InputError(f"duplicate {what}: {_preview(torch.unique(dup))}")
    order = torch.argsort(ids)
    sorted_ids = ids[order]
    pos = torch.searchsorted(sorted_ids, wanted).clamp(max=max(len(ids) - 1, 0))
    found = (sorted_ids[pos] == wanted) if len(ids) else torch.zeros_like(wanted, dtype=torch.bool)
    if not bool(found.all()):
        raise InputError(f"unknown {what} (not in the data): {_preview(wanted[~found])}")
    return order[pos]


def check_not_removed(ids: Tensor, rows: Tensor, removed: Tensor | None) -> None:
    """Refuse rows an earlier change already deleted from the trajectory (one message everywhere)."""
    if removed is None or len(rows) == 0:
        return
    gone = removed[rows]
    if bool(gone.any()):
        raise InputError(f"ids already deleted from this trajectory: {_preview(ids[rows[gone]])}")


class ChangeSet(NamedTuple):
    """What changes in the training data, relative to a trajectory's rows.

    Fields:
      delete: (r,) int64 row positions (into the trajectory's data) of rows to delete
      add:    rows to add, or None
    """

    delete: Tensor
    add: Dataset | None = None

    @property
    def empty(self) -> bool:
        return len(self.delete) == 0 and (self.add is None or len(self.add) == 0)


def make_change_set(data: Dataset, *, delete_ids: Tensor | None = None, add: Dataset | None = None,
                    removed: Tensor | None = None, n_classes: int | None = None) -> ChangeSet:
    """Validate a deletion/addition request against the rows a trajectory was trained on.

    Args:
      data: the trajectory's data (all rows, including ones already removed).
      delete_ids: ids to delete.
      add: rows to add (ids must be new).
      removed: (n,) bool, rows already deleted from the trajectory (online mode).
      n_classes: number of classes for classification, None for regression.

    Returns:
      A :class:`ChangeSet` with row positions.
    """
    delete = torch.zeros(0, dtype=torch.int64)
    if delete_ids is not None:
        delete = rows_of_ids(data.ids, delete_ids, what="ids to delete")
        check_not_removed(data.ids, delete, removed)
    active = len(data) - (int(removed.sum()) if removed is not None else 0)
    n_add = 0 if add is None else len(add)
    if len(delete) >= active + n_add:
        raise InputError(f"the request deletes every one of the {active} remaining rows; "
                         "at least one row must remain")
    if add is not None:
        validate(add, n_features=data.n_features, n_classes=n_classes, what="added rows")
        clash = torch.isin(add.ids, data.ids)
        if bool(clash.any()):
            raise InputError(f"added rows reuse ids already in the data: {_preview(add.ids[clash])}")
        add = add.to(dtype=data.X.dtype, device=data.X.device)
    return ChangeSet(delete.to(data.X.device), add)
