"""Methods that start from one recorded training run: exact retraining, DeltaGrad and fine-tuning.

All three fit the same way (the core's :func:`~deltagrad_ray.core.train`, which records the
trajectory) and share one exact reference: :func:`exact_retrain`, retraining with the same
initialisation, learning rates and batch order on the rows as they are after every change so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.data import ChangeSet, Dataset
from ..core.errors import InputError
from ..core.models import FunctionalModel
from ..core.replay import DeltaGradConfig, deltagrad
from ..core.schedule import BatchPlan
from ..core.train import derived_trajectory, retrain, run_sgd, train
from ..core.trajectory import MemoryRecorder, Trajectory
from .base import Outcome, Rows, TrainConfig, request


class Trained(NamedTuple):
    """A model trained once by recorded GD/SGD, and the rows it has seen since.

    Fields:
      model:  the functional model
      rows:   current rows (fitted rows first, then added ones; deleted ones flagged)
      n_fit:  rows the recorded run was trained on (the first ``n_fit`` of ``rows.data``)
      traj:   the recorded run on those rows (read only)
      params: (p,) the current model
      cache:  the trajectory DeltaGrad replays next: ``traj`` at first, then the replayed (or
              exactly retrained) path over the changed rows (Wu et al. 2020, Sec. 4, online
              deletions); None after fine-tuning, whose model has no such path
    """

    model: FunctionalModel
    rows: Rows
    n_fit: int
    traj: Trajectory
    params: Tensor
    cache: Trajectory | None


def fit_trained(cfg: TrainConfig, data: Dataset) -> Trained:
    """Train ``cfg.spec`` on ``data`` with the core's recorded training.

    Args:
      cfg: model and optimiser settings.
      data: training rows.

    Returns:
      A :class:`Trained` state whose ``params`` are θ_T.
    """
    cfg.check(data)
    model = cfg.model()
    traj = train(model, data, steps=cfg.steps, lrs=cfg.lrs(), l2=cfg.l2, batch_size=cfg.batch_size, seed=cfg.seed)
    return Trained(model, Rows.of(data), len(data), traj, traj.final, traj)


def exact_retrain(model: FunctionalModel, traj: Trajectory, n_fit: int, rows: Rows,
                  record: bool = False) -> tuple[Tensor, Trajectory | None]:
    """Exact retraining on ``rows``, with the same θ_0, learning rates and batch order as ``traj``.

    The rows deleted so far leave their batches and the rows added so far join the batches the
    plan's hash of their id assigns them (the core's :func:`~deltagrad_ray.core.retrain`).

    Args:
      model: the model ``traj`` was trained with.
      traj: the recorded run on ``rows.data[:n_fit]``.
      n_fit: rows of that run.
      rows: the rows now.
      record: also return the retrained path as a trajectory over ``rows`` (a valid DeltaGrad cache).

    Returns:
      (θ_T, trajectory or None).
    """
    base = Dataset(rows.data.X[:n_fit], rows.data.y[:n_fit], rows.data.ids[:n_fit])
    delete = torch.nonzero(rows.removed[:n_fit]).reshape(-1)
    kept_added = n_fit + torch.nonzero(~rows.removed[n_fit:]).reshape(-1)
    add = rows.data.rows(kept_added) if len(kept_added) else None
    rec = MemoryRecorder(traj.steps, traj.p, traj.dtype, traj.initial.device) if record else None
    theta = retrain(model, traj, base, ChangeSet(delete, add), recorder=rec)
    if rec is None:
        return theta, None
    removed = rows.removed if bool(rows.removed.any()) else None
    return theta, derived_trajectory(traj, theta, len(rows.data), removed, rec)


class _TrainedMethod:
    """Shared parts of the methods whose state is :class:`Trained`."""

    train: TrainConfig

    def fit(self, data: Dataset) -> Trained:
        return fit_trained(self.train, data)

    def change(self, state: Trained, *, delete_ids: Tensor | None = None,
               add: Dataset | None = None) -> ChangeSet:
        return request(state.rows, delete_ids=delete_ids, add=add, n_classes=state.model.n_classes)

    def exact(self, state: Trained, change: ChangeSet) -> Outcome:
        rows = state.rows.after(change)
        theta, cache = exact_retrain(state.model, state.traj, state.n_fit, rows, record=True)
        return Outcome(state._replace(rows=rows, params=theta, cache=cache), theta, {})

    def evaluate(self, state: Trained, X: Tensor, y: Tensor) -> dict[str, float]:
        return state.model.evaluate(state.params, X, y)


@dataclass(frozen=True)
class ExactRetrain(_TrainedMethod):
    """Retraining from scratch on the changed data: the ground truth, and the slowest method.

    Args:
      train: model and optimiser settings.
    """

    train: TrainConfig

    @property
    def name(self) -> str:
        return "retrain"

    def apply(self, state: Trained, change: ChangeSet) -> Outcome:
        out = self.exact(state, change)
        return out._replace(info={"steps": self.train.steps})


@dataclass(frozen=True)
class DeltaGrad(_TrainedMethod):
    """DeltaGrad (Wu et al. 2020, Alg. 1) through the common interface: the core's replay.

    The replayed path becomes the next request's cache (``record=True``), so requests chain.

    Args:
      train: model and optimiser settings.
      config: T0, j0, m and safeguards of the replay.
    """

    train: TrainConfig
    config: DeltaGradConfig = field(default_factory=DeltaGradConfig)

    @property
    def name(self) -> str:
        c = self.config
        return f"deltagrad(T0={c.period or 'auto'})" if c.schedule == "uniform" else "deltagrad(geometric)"

    def apply(self, state: Trained, change: ChangeSet) -> Outcome:
        if state.cache is None:
            raise InputError("this state has no trajectory over its rows (it was fine-tuned); "
                             "DeltaGrad needs a state from fit, DeltaGrad or exact retraining")
        res = deltagrad(state.model, state.cache, state.rows.data, change, self.config, record=True)
        rows = state.rows.after(change)
        return Outcome(state._replace(rows=rows, params=res.params, cache=res.trajectory), res.params,
                       res.diagnostics())


@dataclass(frozen=True)
class FineTune(_TrainedMethod):
    """k more steps of the training optimiser on the changed data, from the current model.

    The cheap heuristic of the survey (fine-tuning M0 on D \\ x): for a converged strongly convex
    model it moves towards the new optimum at the optimiser's linear rate, so k steps remove
    roughly a fraction 1 − (1 − ημ)^k of the change's effect.

    Args:
      train: model and optimiser settings (the fine-tuning steps use its η, λ and batch size).
      k: number of steps, >= 1.
      lr: learning rate of the fine-tuning steps (default: the training one).
    """

    train: TrainConfig
    k: int = 5
    lr: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"fine-tuning needs k >= 1 steps, got k={self.k!r}")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"fine-tuning learning rate must be > 0, got {self.lr!r}")

    @property
    def name(self) -> str:
        return f"finetune(k={self.k})"

    def apply(self, state: Trained, change: ChangeSet) -> Outcome:
        rows = state.rows.after(change)
        data = rows.active()
        plan = BatchPlan(len(data), self.train.batch_size, self.train.seed + 1)
        lrs = TrainConfig(self.train.spec, self.k, self.lr or self.train.lr).lrs()
        theta = run_sgd(state.model, data, plan, lrs, self.train.l2, state.params)
        return Outcome(state._replace(rows=rows, params=theta, cache=None), theta, {"steps": self.k})
