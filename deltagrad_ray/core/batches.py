"""Per-step batch composition of a trajectory, and of a change applied to it.

A trajectory was computed on rows ``0 .. n_rows-1`` of its data, of which the first
``plan.n_base`` are placed in batches by the plan's permutation and the rest (rows added by
earlier changes) by the hash of their id; rows flagged in ``removed`` were deleted by earlier
changes. A change set deletes more rows and/or adds new ones. :class:`BatchIndex` answers,
for step t, which rows the cached step used and which of them the change touches — always
by step number, never by a running counter (docs/pitfalls.md, rule 2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .data import ChangeSet, Dataset
from .schedule import BatchPlan

_EMPTY = torch.zeros(0, dtype=torch.int64)


class StepBatch(NamedTuple):
    """The rows of one step, without the (large) list of its base rows.

    Fields:
      epoch, k:   epoch and batch index within it (0 for GD)
      n_removed:  base rows of the cached batch that earlier changes removed
      extra:      (e,) rows >= n_base (added earlier) present in the cached batch
      size:       |B_t|, rows the cached step averaged over
      delete:     (r_t,) rows of this batch the change deletes
      add:        (a_t,) indices into the change's added rows that join this batch

    The base rows themselves come from :meth:`BatchIndex.base`, only when a step needs them
    (explicit steps and training), at O(batch size).
    """

    epoch: int
    k: int
    n_removed: int
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

    Work per epoch is O(r + a + removed) (positions of the few rows that matter); per step
    O(r + a); the base rows of a batch cost O(batch size) when asked for.
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
        self.removed_base = (_EMPTY.to(self.device) if self.removed is None
                             else torch.nonzero(self.removed[:nb]).reshape(-1))
        change = change or ChangeSet(_EMPTY.to(self.device))
        self.delete = change.delete
        self.delete_base = self.delete[self.delete < nb]
        self.delete_extra = self.delete[self.delete >= nb]
        self.add_ids = change.add.ids if change.add is not None else _EMPTY.to(self.device)
        self._epoch = -1
        if plan.full_batch:
            size = nb - len(self.removed_base) + len(self.extra_rows)
            self._gd = StepBatch(0, 0, len(self.removed_base), self.extra_rows, size, self.delete,
                                 torch.arange(len(self.add_ids), device=self.device))
            self._gd_weights = None
            if len(self.removed_base):
                self._gd_weights = torch.ones(nb, dtype=self.dtype, device=self.device)
                self._gd_weights[self.removed_base] = 0

    def _group(self, values: Tensor, keys: Tensor) -> dict[int, Tensor]:
        """``values`` grouped by batch index ``keys`` (one sort per epoch, not a mask per step)."""
        if len(values) == 0:
            return {}
        order = torch.argsort(keys, stable=True)
        ks, vs = keys[order], values[order]
        uniq, counts = torch.unique_consecutive(ks, return_counts=True)
        return dict(zip(uniq.tolist(), torch.split(vs, counts.tolist())))

    def _load_epoch(self, epoch: int) -> None:
        plan = self.plan
        dev = self.device
        k_removed = plan.batch_of_base_rows(self.removed_base, epoch).to(dev)
        self.n_removed = torch.bincount(k_removed, minlength=plan.batches_per_epoch).tolist() \
            if len(k_removed) else None
        k_extra = plan.batch_of_added_ids(self.ids[self.extra_rows], epoch).to(dev)
        self.extra_by_k = self._group(self.extra_rows, k_extra)
        delete_keys = torch.cat([plan.batch_of_base_rows(self.delete_base, epoch).to(dev),
                                 plan.batch_of_added_ids(self.ids[self.delete_extra], epoch).to(dev)])
        self.delete_by_k = self._group(torch.cat([self.delete_base, self.delete_extra]), delete_keys)
        k_add = plan.batch_of_added_ids(self.add_ids, epoch).to(dev)
        self.add_by_k = self._group(torch.arange(len(self.add_ids), device=dev), k_add)
        self._epoch = epoch

    def at(self, step: int) -> StepBatch:
        if self.plan.full_batch:
            return self._gd
        epoch, k = self.plan.locate(step)
        if epoch != self._epoch:
            self._load_epoch(epoch)
        lo, hi = self.plan.batch_bounds(k)
        n_removed = self.n_removed[k] if self.n_removed else 0
        extra = self.extra_by_k.get(k, _EMPTY.to(self.device))
        return StepBatch(epoch, k, n_removed, extra, (hi - lo) - n_removed + len(extra),
                         self.delete_by_k.get(k, _EMPTY.to(self.device)), self.add_by_k.get(k, _EMPTY.to(self.device)))

    def base(self, sb: StepBatch) -> tuple[Tensor | None, Tensor | None]:
        """(base rows, weights) of a step: rows None means all base rows (GD); weights are 1.0
        for rows still present and 0.0 for removed ones, None when none is removed."""
        if self.plan.full_batch:
            return None, self._gd_weights
        rows = self.plan.batch_rows(sb.epoch, sb.k).to(self.device)
        weights = (~self.removed[rows]).to(self.dtype) if sb.n_removed else None
        return rows, weights


def active_rows(index: BatchIndex, sb: StepBatch) -> Tensor:
    """All rows the cached step used, as one index tensor (for exact (re)training)."""
    base, weights = index.base(sb)
    if base is None:
        base = torch.arange(index.plan.n_base, device=index.device)
    if weights is not None:
        base = base[weights > 0]
    return torch.cat([base, sb.extra]) if len(sb.extra) else base
