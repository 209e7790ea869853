"""Change-set generators: leave-one-out, K-fold, random subsets, user lists.

Each returns a list of :class:`~.data.ChangeSet` (deletions), in a stated order, so that
results can be returned in that order (like MAPIE's list of index sets). Each takes the
trajectory's ``removed`` mask (rows earlier changes deleted, e.g. ``traj.removed`` of a derived
cache): by default those rows are left out of the ids drawn from, and naming one of them is refused
with the message :func:`~.data.make_change_set` gives, so no request deletes a row twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .data import ChangeSet, Dataset, check_not_removed, rows_of_ids
from .errors import InputError


def _rows(data: Dataset, ids: Tensor | Sequence[int] | None, removed: Tensor | None) -> Tensor:
    """Row positions of ``ids`` (default: every row still in the trajectory), none of them removed."""
    if ids is None:
        rows = torch.arange(len(data)) if removed is None else torch.nonzero(~removed.cpu()).reshape(-1)
    else:
        try:
            given = torch.as_tensor(ids).reshape(-1)
        except (RuntimeError, OverflowError, TypeError, ValueError) as e:
            raise InputError(f"ids must be integers in the int64 range ({e})") from None
        if given.is_complex() or given.dtype == torch.bool or (
                given.is_floating_point() and not bool((given == given.round()).all())):
            raise InputError(f"ids must be integers, got {given.dtype} values such as {given[:3].tolist()}")
        ids = given.to(torch.int64)
        rows = rows_of_ids(data.ids, ids, what="ids")
    if len(rows) == 0:
        raise InputError("no ids given")
    check_not_removed(data.ids, rows.to(data.ids.device), None if removed is None else removed.to(data.ids.device))
    return rows.to(data.X.device)


def _remaining(data: Dataset, removed: Tensor | None) -> int:
    return len(data) - (int(removed.sum()) if removed is not None else 0)


def leave_one_out(data: Dataset, ids: Tensor | Sequence[int] | None = None, *,
                  removed: Tensor | None = None) -> list[ChangeSet]:
    """One change set per id (default: every row still in the trajectory), each deleting that id alone."""
    rows = _rows(data, ids, removed)
    if _remaining(data, removed) < 2:
        raise InputError("leave-one-out needs at least 2 rows")
    return [ChangeSet(rows[i:i + 1]) for i in range(len(rows))]


def k_fold(data: Dataset, k: int, *, ids: Tensor | Sequence[int] | None = None, seed: int = 0,
           removed: Tensor | None = None) -> list[ChangeSet]:
    """K change sets, fold j deleting the j-th of K seeded, near-equal parts of ``ids``."""
    rows = _rows(data, ids, removed)
    if not isinstance(k, int) or isinstance(k, bool) or k < 2 or k > len(rows):
        raise InputError(f"K must be an integer with 2 <= K <= {len(rows)} (the number of ids), got {k!r}")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).to(rows.device)
    return [ChangeSet(torch.sort(rows[part]).values) for part in torch.tensor_split(perm, k)]


def fold_assignment(data: Dataset, folds: list[ChangeSet]) -> Tensor:
    """(n,) fold index of each row (−1 for rows in no fold)."""
    out = torch.full((len(data),), -1, dtype=torch.int64)
    for j, f in enumerate(folds):
        out[f.delete.cpu()] = j
    return out


def random_subsets(data: Dataset, size: int, count: int, *, ids: Tensor | Sequence[int] | None = None,
                   seed: int = 0, removed: Tensor | None = None) -> list[ChangeSet]:
    """``count`` change sets, each deleting ``size`` ids drawn without replacement (seeded)."""
    rows = _rows(data, ids, removed)
    remaining = _remaining(data, removed)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size < remaining:
        raise InputError(f"subset size must be an integer in [1, {remaining - 1}], got {size!r}")
    if size > len(rows):
        raise InputError(f"subset size {size} exceeds the {len(rows)} ids to draw from")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InputError(f"count must be an integer >= 1, got {count!r}")
    g = torch.Generator().manual_seed(seed)
    return [ChangeSet(torch.sort(rows[torch.randperm(len(rows), generator=g)[:size].to(rows.device)]).values)
            for _ in range(count)]


def from_id_lists(data: Dataset, lists: Sequence[Sequence[int] | Tensor], *,
                  removed: Tensor | None = None) -> list[ChangeSet]:
    """One change set per user-provided id list."""
    out = []
    remaining = _remaining(data, removed)
    for j, ids in enumerate(lists):
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if len(ids) == 0:
            raise InputError(f"id list {j} is empty")
        rows = rows_of_ids(data.ids, ids, what=f"ids in list {j}")
        check_not_removed(data.ids, rows, removed)
        if len(rows) >= remaining:
            raise InputError(f"id list {j} deletes every row")
        out.append(ChangeSet(rows.to(data.X.device)))
    return out
