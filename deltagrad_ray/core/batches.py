"""Per-step batch composition of a trajectory, and of a change applied to it.

A trajectory was computed on rows ``0 .. n_rows-1`` of its data, of which the first
``plan.n_base`` are placed in batches by the plan's permutation and the rest (rows added by
earlier changes) by the hash of their id; rows flagged in ``removed`` were deleted by earlier
changes. A change set deletes more rows and/or adds new ones. :class:`BatchIndex` answers,
for step t, which rows the cached step used and which of them the change touches — always
by step number, never by a running counter (the research code's pitfall 2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .data import ChangeSet, Dataset
from .schedule import BatchPlan

_EMPTY = torch.zeros(0, dtype=torch.int64)


class StepBatch(NamedTuple):
    """The rows of one step.

    Fields:
      base:         (b,) base rows of the cached batch, or None for all base rows (GD)
      base_weights: (b,) or (n_base,) 1.0 for rows still present, 0.0 for removed ones;
                    None when none is removed
      extra:        (e,) rows >= n_base (added earlier) present in the cached batch
      size:         |B_t|, rows the cached step averaged over
      delete:       (r_t,) rows of this batch the change deletes
      add:          (a_t,) indices into the change's added rows that join this batch
    """

    base: Tensor | None
    base_weights: Tensor | None
    extra: Tensor
    size: int
    delete: Tensor
    add: Tensor

    @property
    def new_size(self) -> int:
        return self.size - len(self.delete) + len(self.add)

    @property
    def changed(self) -> bool:
        return len(self.delete) > 0 or len(self.add) > 0


class BatchIndex:
    """Answers :meth:`at` (step → :class:`StepBatch`) for one trajectory and one change.

    Work per epoch is O(n_base) for the permutation (only when the plan has mini-batches),
    then O(r + a) per step.
    """

    def __init__(self, plan: BatchPlan, data: Dataset, removed: Tensor | None,
                 change: ChangeSet | None = None) -> None:
        self.plan = plan
        self.device, self.dtype, self.ids = data.X.device, data.X.dtype, data.ids
        n_rows, nb = len(data), plan.n_base
        self.removed = removed if removed is not None and bool(removed.any()) else None
        self.extra_rows = torch.arange(nb, n_rows, device=self.device)
        if self.removed is not None:
            self.extra_rows = self.extra_rows[~self.removed[nb:]]
        self.extra_ids = data.ids[self.extra_rows]
        self.removed_base = (_EMPTY.to(self.device) if self.removed is None
                             else torch.nonzero(self.removed[:nb]).reshape(-1))
        change = change or ChangeSet(_EMPTY.to(self.device))
        self.delete = change.delete
        self.delete_base = self.delete[self.delete < nb]
        self.delete_extra = self.delete[self.delete >= nb]
        self.add_ids = change.add.ids if change.add is not None else _EMPTY.to(self.device)
        self._epoch = -1
        if plan.full_batch:
            self._gd = self._full_batch()

    def _full_batch(self) -> StepBatch:
        nb = self.plan.n_base
        w = None
        if len(self.removed_base):
            w = torch.ones(nb, dtype=self.dtype, device=self.device)
            w[self.removed_base] = 0
        size = nb - len(self.removed_base) + len(self.extra_rows)
        return StepBatch(None, w, self.extra_rows, size, self.delete,
                         torch.arange(len(self.add_ids), device=self.device))

    def _load_epoch(self, epoch: int) -> None:
        plan, dev = self.plan, self.device
        self.perm = plan.permutation(epoch).to(dev)
        inverse = None
        if len(self.removed_base) or len(self.delete_base):
            inverse = torch.empty(plan.n_base, dtype=torch.int64, device=dev)
            inverse[self.perm] = torch.arange(plan.n_base, device=dev)
        k_of = plan.batch_of_base_rows
        self.k_removed = k_of(self.removed_base, epoch, inverse).to(dev)
        self.k_delete_base = k_of(self.delete_base, epoch, inverse).to(dev)
        self.k_extra = plan.batch_of_added_ids(self.extra_ids, epoch).to(dev)
        self.k_delete_extra = plan.batch_of_added_ids(self.ids[self.delete_extra], epoch).to(dev)
        self.k_add = plan.batch_of_added_ids(self.add_ids, epoch).to(dev)
        self._epoch = epoch

    def at(self, step: int) -> StepBatch:
        if self.plan.full_batch:
            return self._gd
        epoch, k = self.plan.locate(step)
        if epoch != self._epoch:
            self._load_epoch(epoch)
        lo, hi = self.plan.batch_bounds(k)
        base = self.perm[lo:hi]
        n_removed = int((self.k_removed == k).sum()) if len(self.k_removed) else 0
        weights = None
        if n_removed:
            weights = (~self.removed[base]).to(self.dtype)
        extra = self.extra_rows[self.k_extra == k]
        delete = torch.cat([self.delete_base[self.k_delete_base == k],
                            self.delete_extra[self.k_delete_extra == k]])
        add = torch.nonzero(self.k_add == k).reshape(-1)
        return StepBatch(base, weights, extra, (hi - lo) - n_removed + len(extra), delete, add)


def active_rows(sb: StepBatch, n_base: int, device: torch.device) -> Tensor:
    """All rows the cached step used, as one index tensor (for exact (re)training)."""
    base = torch.arange(n_base, device=device) if sb.base is None else sb.base
    if sb.base_weights is not None:
        base = base[sb.base_weights > 0]
    return torch.cat([base, sb.extra]) if len(sb.extra) else base
