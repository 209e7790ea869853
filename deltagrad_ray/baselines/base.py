"""One interface for every unlearning method: fit once, apply a change, compare with an exact reference.

An :class:`Unlearner` is a small frozen configuration with four pure functions over an explicit
state (the optax pattern):

* ``fit(data) -> state``: train on the data once, keeping whatever the method needs later;
* ``change(state, delete_ids=, add=) -> ChangeSet``: a validated request against the state's rows;
* ``apply(state, change) -> Outcome``: the method's (fast) answer to the request;
* ``exact(state, change) -> Outcome``: the method's own exact reference for the same request
  (exact retraining for gradient methods, a refit for ridge, SISA trained from scratch with the
  same shards, a full k-means rerun with the same seeds);
* ``evaluate(state, X, y) -> dict``: accuracy / MSE / k-means loss of the state's model.

Every state carries :class:`Rows`: all rows the method was given (the fitted rows, then rows
added later, in arrival order) and which of them are deleted. A :class:`~deltagrad_ray.core.ChangeSet`
refers to those rows by position, exactly as the core's DeltaGrad replay does, so requests
can be applied one after another (online mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from ..core.data import ChangeSet, Dataset, concat, make_change_set, validate
from ..core.errors import InputError
from ..core.models import FunctionalModel, ModelSpec
from ..core.schedule import learning_rates, splitmix64

S = TypeVar("S")


class Rows(NamedTuple):
    """The rows a fitted method knows about.

    Fields:
      data:    (N, d) every row given so far: the fitted rows, then added rows, in arrival order
      removed: (N,) bool, rows deleted by earlier changes
    """

    data: Dataset
    removed: Tensor

    @staticmethod
    def of(data: Dataset) -> Rows:
        return Rows(data, torch.zeros(len(data), dtype=torch.bool, device=data.X.device))

    @property
    def n_active(self) -> int:
        return len(self.data) - int(self.removed.sum())

    def active_index(self) -> Tensor:
        """(n,) positions of the rows not deleted, in arrival order."""
        return torch.nonzero(~self.removed).reshape(-1)

    def active(self) -> Dataset:
        """The rows not deleted, in arrival order: what a from-scratch fit would see."""
        if not bool(self.removed.any()):
            return self.data
        return self.data.rows(self.active_index())

    def after(self, change: ChangeSet) -> Rows:
        """The rows once ``change`` is applied (deleted rows flagged, added rows appended)."""
        removed = self.removed.clone()
        removed[change.delete] = True
        data = self.data
        if change.add is not None and len(change.add):
            data = concat(data, change.add)
            removed = torch.cat([removed, torch.zeros(len(change.add), dtype=torch.bool, device=removed.device)])
        return Rows(data, removed)


def request(rows: Rows, *, delete_ids: Tensor | None = None, add: Dataset | None = None,
            n_classes: int | None = None, ignore_labels: bool = False) -> ChangeSet:
    """Validate a request against ``rows`` (unknown, duplicate or already deleted ids are errors).

    Args:
      rows: the state's rows.
      delete_ids: ids to delete.
      add: rows to add, with new ids.
      n_classes: classes of the labels (None: real-valued targets).
      ignore_labels: the method ignores labels (k-means): added rows' labels are not checked.

    Returns:
      A :class:`~deltagrad_ray.core.ChangeSet` of positions into ``rows.data``.
    """
    if add is not None and ignore_labels:
        add = Dataset(add.X, torch.zeros(len(add), dtype=rows.data.X.dtype, device=add.X.device), add.ids)
        n_classes = None
    return make_change_set(rows.data, delete_ids=delete_ids, add=add, removed=rows.removed,
                           n_classes=n_classes)


class Outcome(NamedTuple):
    """What a method returns for one change.

    Fields:
      state:  the state after the change (requests can be chained)
      params: the model: (p,) parameters, (S, p) for an ensemble, (k, d) centroids for k-means
      info:   diagnostics (steps taken, shards retrained, whether k-means reran, ...)
    """

    state: Any
    params: Tensor
    info: dict


class Unlearner(Protocol[S]):
    """What the benchmark loops over. Implementations are frozen dataclasses (configs)."""

    @property
    def name(self) -> str: ...

    def fit(self, data: Dataset) -> S: ...

    def change(self, state: S, *, delete_ids: Tensor | None = None, add: Dataset | None = None) -> ChangeSet: ...

    def apply(self, state: S, change: ChangeSet) -> Outcome: ...

    def exact(self, state: S, change: ChangeSet) -> Outcome: ...

    def evaluate(self, state: S, X: Tensor, y: Tensor) -> dict[str, float]: ...


# -- gradient-trained models ----------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained: the settings exact retraining must reuse.

    Args:
      spec: the built-in model (``logreg``, ``linear`` or ``mlp``).
      steps: T, steps of GD (``batch_size=None``) or mini-batch SGD.
      lr: constant learning rate η.
      l2: λ of the objective mean loss + (λ/2)‖θ‖².
      batch_size: mini-batch size, None for GD.
      seed: initialisation and batch order.
    """

    spec: ModelSpec
    steps: int
    lr: float
    l2: float = 0.0
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"learning rate must be a finite number > 0, got {self.lr!r}")
        if not (self.l2 >= 0 and math.isfinite(self.l2)):
            raise InputError(f"l2 must be a finite number >= 0, got {self.l2!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise InputError(f"batch size must be an integer >= 1 or None (GD), got {self.batch_size!r}")

    def lrs(self, steps: int | None = None) -> Tensor:
        return learning_rates(self.steps if steps is None else steps, self.lr)

    def model(self) -> FunctionalModel:
        return self.spec.build()

    def check(self, data: Dataset, what: str = "data") -> None:
        """Raise :class:`InputError` unless ``data`` fits the model (width, label kind)."""
        n_classes = None if self.spec.kind == "linear" else self.spec.n_classes
        validate(data, n_features=self.spec.n_features, n_classes=n_classes, what=what)


# -- seeded per-id randomness ---------------------------------------------------------------------
def id_hash(ids: Tensor, seed: int, salt: int) -> np.ndarray:
    """A uint64 hash of each id under (seed, salt): a row's draw never depends on other rows."""
    key = splitmix64(np.array([(int(seed) * 0x9E3779B1 + int(salt)) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return splitmix64(ids.cpu().numpy().astype(np.int64).view(np.uint64) ^ key[0])


def id_uniform(ids: Tensor, seed: int, salt: int) -> Tensor:
    """(n,) float64 uniforms in (0, 1), one per id, from :func:`id_hash`."""
    h = id_hash(ids, seed, salt) >> np.uint64(11)
    return torch.from_numpy((h.astype(np.float64) + 0.5) * 2.0 ** -53)


def id_bucket(ids: Tensor, seed: int, salt: int, buckets: int) -> Tensor:
    """(n,) int64 bucket in [0, buckets) of each id, from :func:`id_hash`."""
    return torch.from_numpy((id_hash(ids, seed, salt) % np.uint64(buckets)).astype(np.int64))
