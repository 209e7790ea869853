"""DeltaGrad: replay a cached trajectory for changed data (Wu et al. 2020, Algorithm 1).

For each step t the replayed parameters w^I_t differ from the cached w_t by v = w^I_t − w_t.

* **Explicit step** (t < j0, then every T0-th step, or when an approximation is refused):
  the gradient of the cached batch at w^I_t is computed over the batch's rows as they are
  (no gather of the retained rows), the pair (s, y) = (v, ∇F_{B_t}(w^I_t) − g_t) enters the
  L-BFGS history (Alg. 1, lines 5–7).
* **Approximate step**: ∇F_{B_t}(w^I_t) ≈ g_t + B_t·v with the compact L-BFGS matrix
  (Alg. 1, line 10), costing O(m·p).

Either way the changed rows' contribution is then corrected exactly (Alg. 1, line 11):

    ĝ = (|B_t|·(∇F_{B_t}(w^I_t) − λw^I_t) − Σ_{i∈D_t} ∇ℓ_i(w^I_t) + Σ_{i∈A_t} ∇ℓ_i(w^I_t)) / |B'_t| + λw^I_t

touching only the r deleted and a added rows, and w^I_{t+1} = w^I_t − η_t·ĝ.

While the replay has not yet met a changed batch (SGD), w^I_t equals w_t bit for bit and the
cached step is reused as is; at the first changed batch v = 0, so ∇F_{B_t}(w^I_t) = g_t exactly
and no gradient pass is needed.

The state of a replay is an explicit :class:`ReplayState`; :meth:`Replay.run_segment` advances
it over one segment of the cache, so a replay can stream shard after shard or travel between
actors that each hold a step range.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import lbfgs
from .batches import BatchIndex, StepBatch
from .config import DeltaGradConfig
from .data import ChangeSet, Dataset
from .errors import InputError
from .lbfgs import LbfgsHistory
from .models import FunctionalModel
from .train import Recorder, RowGather, changed_data, objective_grad
from .trajectory import MemoryRecorder, Segment, Trajectory

class ReplayState(NamedTuple):
    """Everything a replay carries from one step to the next.

    Fields:
      w:             (p,) w^I_t, the replayed parameters before step ``step``
      history:       L-BFGS pairs
      step:          next step to replay
      synced:        True while w^I_t == w_t bit for bit (no changed batch met yet)
      curvature:     L̂, the largest ‖y‖/‖s‖ of the pairs measured so far
      explicit_steps, approx_steps, fallbacks, skipped_pairs: counters
      gap, next_explicit: the adaptive schedule's current period and next explicit step
      pred_max, pred_sum, pred_n: the L-BFGS prediction error ‖B·s − y‖/‖y‖ measured at
                     explicit steps (before the new pair enters): an accuracy signal for free
    """

    w: Tensor
    history: LbfgsHistory
    step: int
    synced: bool
    curvature: float = 0.0
    explicit_steps: int = 0
    approx_steps: int = 0
    fallbacks: int = 0
    skipped_pairs: int = 0
    gap: int = 1
    next_explicit: int = 0
    pred_max: float = 0.0
    pred_sum: float = 0.0
    pred_n: int = 0


def _non_expansive(v: Tensor, Bv: Tensor, lr: float) -> bool:
    """‖v − η·Bv‖ ≤ ‖v‖, i.e. η‖Bv‖² ≤ 2·vᵀBv (see DeltaGradConfig)."""
    vd, bd = v.double(), Bv.double()
    return lr * float(bd @ bd) <= 2 * float(vd @ bd) * (1 + 1e-12)


class ReplayResult(NamedTuple):
    """Outcome of a replay: final parameters, diagnostics, and the new trajectory if recorded.

    ``prediction_error_max`` / ``_mean``: how far the L-BFGS product was from the exact
    gradient difference at the explicit steps (0 = perfect, 1 = no better than predicting
    nothing). Values near 1 warn that approximate steps were inaccurate: use a smaller period,
    a longer history, or ``schedule="adaptive"``.
    """

    params: Tensor
    steps: int
    explicit_steps: int
    approx_steps: int
    fallbacks: int
    skipped_pairs: int
    trajectory: Trajectory | None = None
    prediction_error_max: float = 0.0
    prediction_error_mean: float = 0.0

    def diagnostics(self) -> dict:
        return {"steps": self.steps, "explicit_steps": self.explicit_steps,
                "approx_steps": self.approx_steps, "fallbacks": self.fallbacks,
                "skipped_pairs": self.skipped_pairs,
                "prediction_error_max": round(self.prediction_error_max, 6),
                "prediction_error_mean": round(self.prediction_error_mean, 6)}


class Replay:
    """One change set replayed over one trajectory.

    Args:
      model: the functional model the trajectory was trained with.
      traj: the cached trajectory (read only).
      data: the rows ``traj`` was trained on (``traj.n_rows`` of them).
      change: rows to delete / add, e.g. from :func:`~.data.make_change_set`.
      config: :class:`DeltaGradConfig`.
    """

    def __init__(self, model: FunctionalModel, traj: Trajectory, data: Dataset, change: ChangeSet,
                 config: DeltaGradConfig = DeltaGradConfig()) -> None:
        if len(data) != traj.n_rows:
            raise InputError(f"the trajectory was trained on {traj.n_rows} rows, the data has {len(data)}")
        self.model, self.traj, self.data, self.change, self.config = model, traj, data, change, config
        self.l2 = traj.l2
        self.index = BatchIndex(traj.plan, data, traj.removed, change)
        self.explicit = config.explicit_steps(traj.steps).tolist()
        self.adaptive = config.schedule == "adaptive"
        self.gather = RowGather(data.X)
        nb = traj.plan.n_base
        self._full = traj.plan.full_batch
        if self._full:  # the same rows every step: slice/gather them once
            sb = self.index.at(0)
            self._gd_extra = (data.X[sb.extra], data.y[sb.extra])
            self._gd_delete = (data.X[sb.delete], data.y[sb.delete])
        self._X_base, self._y_base = data.X[:nb], data.y[:nb]

    def start(self) -> ReplayState:
        """State before step 0: w^I_0 = w_0."""
        t = self.traj
        hist = lbfgs.empty_history(self.config.history, t.p, t.dtype, t.initial.device, self.config.sigma)
        return ReplayState(t.initial, hist, 0, True, gap=self.config.period, next_explicit=self.config.burn_in)

    # -- gradients over rows ------------------------------------------------------------
    def _rows_grad(self, w: Tensor, rows: Tensor, gd_cached: tuple[Tensor, Tensor] | None) -> Tensor:
        if gd_cached is not None:
            return self.model.grad_sum(w, *gd_cached)
        return self.model.grad_sum(w, self.data.X[rows], self.data.y[rows])

    def _cached_batch_grad(self, w: Tensor, sb: StepBatch) -> Tensor:
        """Σ ∇ℓ_i(w) over the rows of the cached step's batch, weighted, without dropping rows."""
        base, weights = self.index.base(sb)
        if base is None:
            G = self.model.grad_sum(w, self._X_base, self._y_base, weights)
        else:
            G = self.model.grad_sum(w, self.gather(base), self.data.y[base], weights)
        if len(sb.extra):
            G = G + self._rows_grad(w, sb.extra, self._gd_extra if self._full else None)
        return G

    def _change_grad(self, w: Tensor, sb: StepBatch) -> Tensor | None:
        """Σ_{A_t} ∇ℓ_i(w) − Σ_{D_t} ∇ℓ_i(w): the exact correction for the changed rows."""
        corr = None
        if len(sb.delete):
            corr = -self._rows_grad(w, sb.delete, self._gd_delete if self._full else None)
        if len(sb.add):
            add = self.change.add
            Ga = self.model.grad_sum(w, add.X[sb.add], add.y[sb.add])
            corr = Ga if corr is None else corr + Ga
        return corr

    # -- one step -------------------------------------------------------------------------
    def _step(self, st: ReplayState, t: int, w_t: Tensor, g_t: Tensor, lr: float,
              rec: Recorder | None) -> ReplayState:
        sb = self.index.at(t)
        w = st.w
        if st.synced and not sb.changed:
            # w^I_t == w_t and B_t unchanged: the cached step is the exact step.
            if rec is not None:
                rec.record(t, w, g_t)
            return st._replace(w=w - lr * g_t, step=t + 1)
        hist, curv = st.history, st.curvature
        counts = dict(explicit_steps=st.explicit_steps, approx_steps=st.approx_steps,
                      fallbacks=st.fallbacks, skipped_pairs=st.skipped_pairs)
        gap, next_explicit = st.gap, st.next_explicit
        pred_max, pred_sum, pred_n = st.pred_max, st.pred_sum, st.pred_n
        G = None        # Σ over the cached batch at w^I_t, when computed exactly
        full = None     # ∇F_{B_t}(w^I_t), exact or approximated
        scheduled = self.explicit[t] or (self.adaptive and t >= next_explicit)
        if st.synced:
            full = g_t  # v = 0: the cached gradient is the gradient at w^I_t
        elif not scheduled:
            v = w - w_t
            prod = lbfgs.hvp(hist, v)
            Bv = None
            if prod is not None:
                limit = self.config.curvature_guard * curv
                if self.config.max_curvature is not None:
                    limit = min(limit, self.config.max_curvature)
                if prod[1] <= limit and _non_expansive(v, prod[0], lr):
                    Bv = prod[0]
            if Bv is None:
                counts["fallbacks"] += 1
            else:
                full = g_t + Bv
                counts["approx_steps"] += 1
        for _attempt in range(2):
            if full is None:  # explicit step (Alg. 1, lines 5-7)
                G = self._cached_batch_grad(w, sb)
                full = objective_grad(G, sb.size, w, self.l2)
                counts["explicit_steps"] += 1
                s, y = w - w_t, full - g_t
                if hist.size and not st.synced:  # how good would the approximation have been?
                    pred = lbfgs.hvp(hist, s)
                    if pred is not None:
                        e = float((pred[0] - y).norm()) / max(float(y.norm()), 1e-300)
                        pred_max, pred_sum, pred_n = max(pred_max, e), pred_sum + e, pred_n + 1
                        if self.adaptive and t >= self.config.burn_in:
                            tol = self.config.adaptive_tol
                            gap = max(1, gap // 2) if e > tol else min(self.config.period, gap * 2) \
                                if e < tol / 4 else gap
                if self.adaptive and t >= self.config.burn_in:
                    next_explicit = t + gap
                if lbfgs.curvature_ok(s, y, self.config.curvature_eps):
                    hist = lbfgs.push(hist, s, y)
                    curv = max(curv, float(y.norm()) / float(s.norm()))
                else:
                    counts["skipped_pairs"] += 1
            G_cached = G if G is not None else sb.size * (full - self.l2 * w)
            corr = self._change_grad(w, sb)
            g = objective_grad(G_cached if corr is None else G_cached + corr, sb.new_size, w, self.l2)
            w_next = w - lr * g
            if G is not None or bool(torch.isfinite(w_next).all()):
                break
            # the approximation produced inf/NaN: redo this step explicitly
            counts["approx_steps"] -= 1
            counts["fallbacks"] += 1
            full = None
        if rec is not None:
            rec.record(t, w, g)
        return ReplayState(w_next, hist, t + 1, False, curv, **counts, gap=gap, next_explicit=next_explicit,
                           pred_max=pred_max, pred_sum=pred_sum, pred_n=pred_n)

    # -- segments and whole replays ----------------------------------------------------------
    def run_segment(self, st: ReplayState, seg: Segment, rec: Recorder | None = None) -> ReplayState:
        """Advance ``st`` over the steps of ``seg`` (which must start at ``st.step``)."""
        if seg.start != st.step:
            raise ValueError(f"segment starts at step {seg.start}, the replay is at step {st.step}")
        lrs = seg.lrs.tolist()
        for i in range(seg.stop - seg.start):
            st = self._step(st, seg.start + i, seg.params[i], seg.grads[i], lrs[i], rec)
        return st

    def run(self, record: bool = False, recorder: Recorder | None = None) -> ReplayResult:
        """Replay the whole trajectory. With ``record`` (or a ``recorder``, e.g. a cache writer)
        the result carries the replayed path as a new :class:`Trajectory` over the changed data
        (online mode)."""
        traj = self.traj
        rec = recorder
        if rec is None and record:
            rec = MemoryRecorder(traj.steps, traj.p, traj.dtype, traj.initial.device)
        st = self.start()
        for seg in traj.segments():
            st = self.run_segment(st, seg, rec)
        new_traj = None
        if rec is not None:
            new_data, removed = changed_data(traj, self.data, self.change)
            new_traj = Trajectory(traj.plan, traj.l2, traj.lrs, traj.initial, st.w, len(new_data),
                                  removed, rec.finish(traj.lrs))
        return ReplayResult(st.w, traj.steps, st.explicit_steps, st.approx_steps, st.fallbacks,
                            st.skipped_pairs, new_traj, st.pred_max, st.pred_sum / max(st.pred_n, 1))


def deltagrad(model: FunctionalModel, traj: Trajectory, data: Dataset, change: ChangeSet,
              config: DeltaGradConfig = DeltaGradConfig(), *, record: bool = False,
              recorder: Recorder | None = None) -> ReplayResult:
    """Parameters after ``change``, replayed from ``traj`` with DeltaGrad.

    Args:
      model: the model ``traj`` was trained with.
      traj: the cached trajectory; never modified.
      data: its training rows.
      change: deletions/additions (see :func:`~.data.make_change_set`).
      config: T0, j0, m and safeguards.
      record: also return the replayed path as a new trajectory (online mode).
      recorder: where to record that path (default: memory), e.g. a cache writer.

    Returns:
      :class:`ReplayResult` with ``params`` (p,) and counters.

    Example:
      >>> from deltagrad_ray.core import *
      >>> data = synthetic_classification(300, 5, 3, seed=0)
      >>> m = ModelSpec("logreg", 5, 3).build()
      >>> traj = train(m, data, steps=30, lrs=learning_rates(30, 0.5), l2=0.01)
      >>> change = make_change_set(data, delete_ids=torch.tensor([3, 7]), n_classes=3)
      >>> res = deltagrad(m, traj, data, change)
      >>> exact = retrain(m, traj, data, change)
      >>> bool((res.params - exact).norm() < 0.05 * (exact - traj.final).norm())
      True
    """
    if change.empty and recorder is None:
        return ReplayResult(traj.final.clone(), traj.steps, 0, 0, 0, 0, traj if record else None)
    return Replay(model, traj, data, change, config).run(record=record, recorder=recorder)


def deltagrad_online(model: FunctionalModel, traj: Trajectory, data: Dataset,
                     deletions: list[Tensor], config: DeltaGradConfig = DeltaGradConfig(),
                     n_classes: int | None = None) -> ReplayResult:
    """Apply deletion requests one after another; each replayed path becomes the next cache.

    Args:
      deletions: a list of id tensors, applied in order.

    Returns:
      The last :class:`ReplayResult`; its ``trajectory`` is the final cache (over the same
      ``data``, with the deleted rows flagged) and its counters are summed over all requests.
    """
    from .data import make_change_set

    totals = dict(explicit_steps=0, approx_steps=0, fallbacks=0, skipped_pairs=0)
    worst = 0.0
    res = None
    for ids in deletions:
        change = make_change_set(data, delete_ids=ids, removed=traj.removed, n_classes=n_classes)
        res = deltagrad(model, traj, data, change, config, record=True)
        for k in totals:
            totals[k] += getattr(res, k)
        worst = max(worst, res.prediction_error_max)
        traj = res.trajectory
    if res is None:
        raise InputError("no deletion requests given")
    return res._replace(**totals, prediction_error_max=worst)


def relative_error(approx: Tensor, exact: Tensor, reference: Tensor) -> float:
    """‖approx − exact‖ / ‖exact − reference‖: DeltaGrad's error against the deletion's effect."""
    den = float((exact - reference).norm())
    return float((approx - exact).norm()) / den if den > 0 else math.inf
