"""Training that records its trajectory, and exact retraining — the ground truth.

Both run one loop, :func:`run_sgd`: w_{t+1} = w_t − η_t·(Σ_{i∈B_t} ∇ℓ_i(w_t)/|B_t| + λ·w_t). The
batch B_t comes from :class:`~.batches.BatchIndex`, so retraining after a change uses the same
initialisation, learning rates and batch order as the original run, minus the deleted rows
and plus the added rows (placed by the plan's hash of their id). Retraining with no change
runs the identical sequence of operations and reproduces the recorded run bit for bit.

A batch that lost all its rows contributes no data gradient: its step applies only the
regulariser, w_{t+1} = w_t − η_t·λ·w_t, and every later step keeps its step number.

A run that diverges stops where it does, with an :class:`~.errors.InputError` naming the step:
every step's gradient must be finite (its sum, one reduction over p values: NaN or inf anywhere
make it non-finite), and training also checks, every :data:`CHECK_EVERY` steps and at the last,
that the objective on a fixed sample of rows has not grown :data:`GROWTH` times above its value at
θ_0 (too large a learning rate makes GD's iterates grow geometrically: finite for a while, then
inf). Measured on 2 shared cores: the sum costs 2.6 µs a step for p = 7,850 (0.9% of the smallest
step measured, 0.3 ms); a check costs at most about one gradient of a batch, so 1% or less of
the gradient time.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Protocol

import torch
from torch import Tensor

from .batches import BatchIndex, StepBatch, active_rows
from .data import ChangeSet, Dataset, concat
from .errors import InputError
from .models import FunctionalModel
from .schedule import BatchPlan
from .trajectory import MemoryRecorder, SegmentSource, Trajectory


class Recorder(Protocol):
    def record(self, step: int, theta: Tensor, grad: Tensor) -> None: ...

    def finish(self, lrs: Tensor) -> SegmentSource: ...


POOL_BYTES = 1 << 30  # the largest gather buffer kept for the next gatherer (CPU only; CUDA has its own cache)
_pool_lock = threading.Lock()
_pool: dict[tuple, Tensor] = {}  # (dtype, width) -> one free buffer


POOL_SLACK = 4  # a gatherer takes the pooled buffer only if it asks for at least 1/4 of its rows


def _take_buffer(rows: int, width: int, dtype: torch.dtype) -> Tensor:
    """The free pooled buffer if it has at least ``rows`` rows and not :data:`POOL_SLACK` times more
    (a gatherer of a few changed rows must not take the buffer of the batches), or a new one."""
    key = (dtype, width)
    with _pool_lock:
        buf = _pool.get(key)
        if buf is not None and rows <= buf.shape[0] <= POOL_SLACK * rows:
            return _pool.pop(key)
    return torch.empty(rows, width, dtype=dtype)


def _return_buffer(held: list[Tensor]) -> None:
    """Keep a collected gatherer's buffer for the next one (the larger of it and the one kept),
    within POOL_BYTES."""
    if not held:
        return
    buf = held[0]
    if buf.numel() * buf.element_size() > POOL_BYTES:
        return
    key = (buf.dtype, buf.shape[1])
    with _pool_lock:
        kept = _pool.get(key)
        if kept is None or kept.shape[0] < buf.shape[0]:
            _pool[key] = buf


class RowGather:
    """Gathers rows into one reused buffer: a fresh 100 MB tensor per step costs page faults
    that take 5× longer than the copy itself (measured: 42 ms vs 7.5 ms for 16k × 784 float64).

    On the CPU the buffer also outlives its gatherer: when a gatherer is collected its buffer
    goes back to a process-wide pool (one per dtype and width, at most :data:`POOL_BYTES`), and
    the next gatherer — the next replay or retraining in this process — starts without the
    first-touch page faults (measured: 29–33 ms for a fresh 16,384 × 784 float64 buffer, 9–10 ms
    reused). A buffer belongs to one live gatherer at a time, so two gatherers never share one.
    """

    def __init__(self, X: Tensor) -> None:
        self.X = X
        self.buf: Tensor | None = None
        self._held: list[Tensor] = []  # the pooled buffer, handed back when this gatherer is collected
        if X.device.type == "cpu":
            weakref.finalize(self, _return_buffer, self._held).atexit = False  # nothing to keep at exit

    def __call__(self, rows: Tensor) -> Tensor:
        m = int(rows.shape[0])
        if self.buf is None or self.buf.shape[0] < m:
            if self.X.device.type == "cpu":
                self.buf = _take_buffer(m, self.X.shape[1], self.X.dtype)
                self._held[:] = [self.buf]
            else:
                self.buf = torch.empty(m, self.X.shape[1], dtype=self.X.dtype, device=self.X.device)
        out = self.buf[:m]
        torch.index_select(self.X, 0, rows, out=out)
        return out


def objective_grad(grad_sum: Tensor, size: int, w: Tensor, l2: float) -> Tensor:
    """∇F_B(w) = Σ_B ∇ℓ_i / |B| + λw from the loss-gradient sum (0 data term for an empty batch)."""
    if size == 0:
        return l2 * w
    return grad_sum / size + l2 * w


CHECK_EVERY = 100   # steps between two objective checks of a training run (and the last step)
GROWTH = 1e4        # growth of the objective over its value at θ_0 that stops a run as diverged
CHECK_ROWS = 1024   # rows of the objective check: the first rows of the data, at most a batch


class _Growth:
    """The objective F(w) = mean loss + (λ/2)‖w‖² on a fixed sample of rows, against F(θ_0).

    At most one batch's rows: a check (a loss, no gradient) costs about one gradient of a batch at
    most, so every :data:`CHECK_EVERY` steps it stays within about 1% of the run."""

    def __init__(self, model: FunctionalModel, X: Tensor, y: Tensor, l2: float, theta0: Tensor) -> None:
        self.model, self.X, self.y, self.l2 = model, X, y, l2
        self.f0 = self.objective(theta0)

    def objective(self, w: Tensor) -> float:
        with torch.no_grad():
            return float(self.model.loss_sum(w, self.X, self.y) / max(1, len(self.X)) + self.l2 / 2 * (w @ w))

    def check(self, t: int, w: Tensor, lr: float) -> None:
        f = self.objective(w)
        if not math.isfinite(f) or (self.f0 > 0 and f > GROWTH * self.f0):
            grew = f"{f:.4g}" if math.isfinite(f) else "an overflow (inf or NaN)"
            raise InputError(f"training diverged by step {t}: the objective grew from {self.f0:.4g} at the start to "
                             f"{grew}; use a smaller learning rate (lr / --lr; η was {lr:g} at this step)")


def _diverged(t: int, lr: float, what: str) -> InputError:
    return InputError(f"training diverged at step {t}: {what} not finite (NaN or inf); use a smaller learning "
                      f"rate (lr / --lr; η was {lr:g} at this step), or scale the features")


def run_sgd(model: FunctionalModel, data: Dataset, plan: BatchPlan, lrs: Tensor, l2: float,
            theta0: Tensor, removed: Tensor | None = None,
            recorder: Recorder | None = None, *, check_growth: bool = False) -> Tensor:
    """The training loop (GD when ``plan.full_batch``). Returns θ_T; records into ``recorder``.

    Raises :class:`InputError` at the first step whose gradient is not finite (nothing of that step
    is recorded) and, with ``check_growth``, when the objective has grown :data:`GROWTH` times
    over F(θ_0) (checked every :data:`CHECK_EVERY` steps, at the last, and when the recorder refuses
    a step, e.g. a value beyond its storage dtype's range).
    """
    index = BatchIndex(plan, data, removed)
    gather = RowGather(data.X)
    w = theta0.clone()
    const: tuple[Tensor, Tensor] | None = None
    T = int(lrs.shape[0])
    growth = None
    if check_growth and T:
        n = min(CHECK_ROWS, len(data), len(data) if plan.full_batch else int(plan.batch_size))
        growth = _Growth(model, data.X[:n], data.y[:n], l2, theta0)
    for t in range(T):
        sb: StepBatch = index.at(t)
        if plan.full_batch:
            if const is None:  # the same rows every step: gather them at most once
                if sb.n_removed == 0 and len(sb.extra) == 0:
                    const = (data.X[: plan.n_base], data.y[: plan.n_base])
                else:
                    rows = active_rows(index, sb)
                    const = (data.X[rows], data.y[rows])
            Xb, yb = const
        else:
            rows = active_rows(index, sb)
            Xb, yb = gather(rows), data.y[rows]
        g = objective_grad(model.grad_sum(w, Xb, yb), sb.size, w, l2)
        lr = float(lrs[t])
        if not math.isfinite(float(g.sum())):  # one reduction: NaN or inf anywhere make the sum non-finite
            raise _diverged(t, lr, "the gradient is")
        if growth is not None and t > 0 and t % CHECK_EVERY == 0:
            growth.check(t, w, lr)
        if recorder is not None:
            try:
                recorder.record(t, w, g)
            except InputError:  # e.g. beyond the storage dtype's range: say so if the run is diverging
                if growth is not None:
                    growth.check(t, w, lr)
                raise
        w = w - lr * g
    if T and not bool(torch.isfinite(w).all()):
        raise _diverged(T - 1, float(lrs[T - 1]), "the parameters after the last step are")
    if growth is not None:
        growth.check(T, w, float(lrs[T - 1]))
    return w


def train(model: FunctionalModel, data: Dataset, *, steps: int, lrs: Tensor, l2: float = 0.0,
          batch_size: int | None = None, seed: int = 0, recorder: Recorder | None = None) -> Trajectory:
    """Train by GD (``batch_size=None``) or mini-batch SGD, recording the trajectory.

    Args:
      model: the functional model.
      data: training rows (features in the training dtype, on the training device).
      steps: T.
      lrs: (T,) learning rates, e.g. from :func:`~.schedule.learning_rates`.
      l2: λ.
      batch_size: mini-batch size, None for full-batch GD.
      seed: seeds the initialisation (MLP) and the batch order.
      recorder: where θ_t, g_t go (default: memory).

    Returns:
      The :class:`Trajectory`.

    Raises:
      InputError: the run diverged (a non-finite gradient, or the objective grown by orders of
        magnitude); the message names the step.

    Example:
      >>> from deltagrad_ray.core import ModelSpec, learning_rates, synthetic_classification
      >>> data = synthetic_classification(200, 5, 3, seed=0)
      >>> m = ModelSpec("logreg", 5, 3).build()
      >>> traj = train(m, data, steps=20, lrs=learning_rates(20, 0.5), l2=0.01)
      >>> traj.steps, traj.p
      (20, 18)
    """
    if lrs.shape != (steps,):
        raise InputError(f"expected {steps} learning rates, got shape {tuple(lrs.shape)}")
    if not (l2 >= 0):
        raise InputError(f"l2 must be >= 0, got {l2!r}")
    plan = BatchPlan(len(data), batch_size, seed)
    theta0 = model.init_params(seed, dtype=data.X.dtype, device=data.X.device)
    rec = recorder or MemoryRecorder(steps, model.p, data.X.dtype, data.X.device)
    final = run_sgd(model, data, plan, lrs, l2, theta0, None, rec, check_growth=True)
    return Trajectory(plan, float(l2), lrs.to(torch.float64).cpu(), theta0, final, len(data), None,
                      rec.finish(lrs))


def changed_data(traj: Trajectory, data: Dataset, change: ChangeSet) -> tuple[Dataset, Tensor]:
    """The data and removed-mask a trajectory would have after ``change``."""
    removed = traj.removed.clone() if traj.removed is not None else torch.zeros(
        len(data), dtype=torch.bool, device=data.X.device)
    removed[change.delete] = True
    if change.add is not None and len(change.add):
        data = concat(data, change.add)
        removed = torch.cat([removed, torch.zeros(len(change.add), dtype=torch.bool,
                                                  device=removed.device)])
    return data, removed


def changed_trajectory(traj: Trajectory, data: Dataset, change: ChangeSet, final: Tensor,
                       recorder: Recorder) -> Trajectory:
    """The trajectory a replay or an exact retraining of ``change`` recorded (``recorder``), ending at
    ``final``: ``traj``'s plan, l2, schedule and θ_0 over the changed rows (:func:`changed_data`).
    The way a derived trajectory is built (DeltaGrad, exact retraining, the estimators)."""
    new_data, removed = changed_data(traj, data, change)
    return derived_trajectory(traj, final, len(new_data), removed, recorder)


def derived_trajectory(traj: Trajectory, final: Tensor, n_rows: int, removed: Tensor | None,
                       recorder: Recorder) -> Trajectory:
    """A trajectory recorded (``recorder``) by a rerun of ``traj`` — its plan, l2, schedule and θ_0 —
    over ``n_rows`` rows of which ``removed`` (None: none) are out, ending at ``final``. The one
    constructor of derived trajectories: :func:`changed_trajectory` and callers that keep their own
    row layout (the gradient baselines) both go through it."""
    return Trajectory(traj.plan, traj.l2, traj.lrs, traj.initial, final, n_rows, removed, recorder.finish(traj.lrs))


def retrain(model: FunctionalModel, traj: Trajectory, data: Dataset, change: ChangeSet,
            recorder: Recorder | None = None) -> Tensor:
    """Exact retraining after ``change``: the ground truth DeltaGrad is measured against.

    Same θ_0, learning rates and batch order as ``traj``; deleted rows leave their batches,
    added rows join the batches the plan's hash assigns them. Returns θ_T.
    """
    if len(data) != traj.n_rows:
        raise InputError(f"the trajectory was trained on {traj.n_rows} rows, the data has {len(data)}")
    new_data, removed = changed_data(traj, data, change)
    return run_sgd(model, new_data, traj.plan, traj.lrs, traj.l2, traj.initial, removed, recorder)
