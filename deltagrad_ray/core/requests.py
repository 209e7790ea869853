"""Change-set generators: leave-one-out, K-fold, random subsets, user lists.

Each returns a list of :class:`~.data.ChangeSet` (deletions), in a stated order, so that
results can be returned in that order (like MAPIE's list of index sets).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .data import ChangeSet, Dataset, rows_of_ids
from .errors import InputError


def _ids(data: Dataset, ids: Tensor | Sequence[int] | None) -> Tensor:
    ids = data.ids if ids is None else torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if len(ids) == 0:
        raise InputError("no ids given")
    return ids


def leave_one_out(data: Dataset, ids: Tensor | Sequence[int] | None = None) -> list[ChangeSet]:
    """One change set per id (default: every row), each deleting that id alone."""
    ids = _ids(data, ids)
    rows = rows_of_ids(data.ids, ids, what="ids")
    if len(data) < 2:
        raise InputError("leave-one-out needs at least 2 rows")
    return [ChangeSet(rows[i:i + 1]) for i in range(len(rows))]


def k_fold(data: Dataset, k: int, *, ids: Tensor | Sequence[int] | None = None, seed: int = 0) -> list[ChangeSet]:
    """K change sets, fold j deleting the j-th of K seeded, near-equal parts of ``ids``."""
    ids = _ids(data, ids)
    if not isinstance(k, int) or k < 2 or k > len(ids):
        raise InputError(f"K must be an integer with 2 <= K <= {len(ids)} (the number of ids), got {k!r}")
    rows = rows_of_ids(data.ids, ids, what="ids")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return [ChangeSet(torch.sort(rows[part]).values) for part in torch.tensor_split(perm, k)]


def fold_assignment(data: Dataset, folds: list[ChangeSet]) -> Tensor:
    """(n,) fold index of each row (−1 for rows in no fold)."""
    out = torch.full((len(data),), -1, dtype=torch.int64)
    for j, f in enumerate(folds):
        out[f.delete.cpu()] = j
    return out


def random_subsets(data: Dataset, size: int, count: int, *, ids: Tensor | Sequence[int] | None = None,
                   seed: int = 0) -> list[ChangeSet]:
    """``count`` change sets, each deleting ``size`` ids drawn without replacement (seeded)."""
    ids = _ids(data, ids)
    if not isinstance(size, int) or not 1 <= size < len(data):
        raise InputError(f"subset size must be an integer in [1, {len(data) - 1}], got {size!r}")
    if size > len(ids):
        raise InputError(f"subset size {size} exceeds the {len(ids)} ids to draw from")
    if not isinstance(count, int) or count < 1:
        raise InputError(f"count must be an integer >= 1, got {count!r}")
    rows = rows_of_ids(data.ids, ids, what="ids")
    g = torch.Generator().manual_seed(seed)
    return [ChangeSet(torch.sort(rows[torch.randperm(len(rows), generator=g)[:size]]).values) for _ in range(count)]


def from_id_lists(data: Dataset, lists: Sequence[Sequence[int] | Tensor]) -> list[ChangeSet]:
    """One change set per user-provided id list."""
    out = []
    for j, ids in enumerate(lists):
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if len(ids) == 0:
            raise InputError(f"id list {j} is empty")
        rows = rows_of_ids(data.ids, ids, what=f"ids in list {j}")
        if len(rows) >= len(data):
            raise InputError(f"id list {j} deletes every row")
        out.append(ChangeSet(rows))
    return out
