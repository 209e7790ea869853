"""DeltaGrad: replay a cached trajectory for changed data (Wu et al. 2020, Algorithm 1).

This module is the one implementation of the replay. It advances B change sets ("requests") at
once; a single request is a batch of one (:func:`deltagrad`). For each step t, request b's
replayed parameters w^I_t differ from the cached w_t by v_b = w^I_t − w_t.

* **Explicit step** (t < j0, then every T0-th step, or when an approximation is refused):
  the gradient of the cached batch at w^I_t is computed over the batch's rows as they are
  (no gather of the retained rows), and the pair (s, y) = (v, ∇F_{B_t}(w^I_t) − g_t) enters
  the request's L-BFGS history (Alg. 1, lines 5–7). The requests needing one at step t share
  one computation over the rows: a GEMM against their B parameter vectors for the linear
  models, ``vmap`` otherwise (docs/pitfalls.md, rule 7).
* **Approximate step**: ∇F_{B_t}(w^I_t) ≈ g_t + B_t·v with the compact L-BFGS matrix
  (Alg. 1, line 10), O(m·p) per request, vectorised over the batch (:mod:`.lbfgs`).

Either way the changed rows' contribution is then corrected exactly (Alg. 1, line 11):

    ĝ = (|B_t|·(∇F_{B_t}(w^I_t) − λw^I_t) − Σ_{i∈D_t} ∇ℓ_i(w^I_t) + Σ_{i∈A_t} ∇ℓ_i(w^I_t)) / |B'_t| + λw^I_t

touching only the r deleted and a added rows (gathered once per request into one padded
(B, r, d) table), and w^I_{t+1} = w^I_t − η_t·ĝ.

While a request has not yet met a changed batch (SGD), w^I_t equals w_t bit for bit and the
cached step is reused as is; at its first changed batch v = 0, so ∇F_{B_t}(w^I_t) = g_t exactly
and no gradient pass is needed.

The state of a batch is an explicit :class:`ReplayState`; :meth:`Replay.run_segment` advances
it over one segment of the cache, so a replay can stream shard after shard or travel between
actors that each hold a step range. States can be split (``select``), merged (``concat``) and
moved between devices (``to``) without knowing their fields (:mod:`.state`).

With ``gemm_dtype=torch.float32`` on float64 data, the explicit-step GEMMs run in difference
form — X·(w_b − w_t) in float32 around a float64 reference — which doubles the GEMM rate on
CPUs at a relative error of ~1e-7 on the (small) differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from . import certificate, lbfgs
from .batches import BatchIndex, StepBatch
from .config import DeltaGradConfig
from .data import ChangeSet, Dataset, check_not_removed, make_change_set
from .errors import InputError
from .lbfgs import Histories, PathPairs, Secants, SharedPairs
from .models import FunctionalModel, ManyRef
from .state import Batched
from .train import Recorder, RowGather, changed_trajectory
from .trajectory import MemoryRecorder, Segment, Trajectory


class RequestError(InputError):
    """Some requests of a batch cannot be replayed: ``reasons`` maps their index in the batch to
    why (a bad change set, or parameters that became non-finite). The other requests are fine:
    a fan-out reports these and replays the rest."""

    def __init__(self, reasons: dict[int, str]) -> None:
        self.reasons = dict(reasons)
        shown = "; ".join(f"request {b}: {r}" for b, r in list(self.reasons.items())[:3])
        more = f" (and {len(self.reasons) - 3} more)" if len(self.reasons) > 3 else ""
        super().__init__(shown + more)

    def __reduce__(self):  # crosses process boundaries (Ray) with its reasons
        return type(self), (self.reasons,)


@dataclass(frozen=True, eq=False)
class ReplayState(Batched):
    """Everything B replays carry from one step to the next (one row per request).

    Fields:
      W:             (B, p) w^I_t, the replayed parameters before step ``step``
      history:       the requests' L-BFGS pairs (:class:`~.lbfgs.Histories`)
      step:          next step to replay
      synced:        (B,) True while w^I_t == w_t bit for bit (no changed batch met yet)
      curvature:     (B,) L̂, the largest ‖y‖/‖s‖ of the pairs measured so far
      explicit_steps, approx_steps, fallbacks, skipped_pairs: (B,) int64 counters
      gap, next_explicit: (B,) the adaptive schedule's current period and next explicit step
      pred_max, pred_sum, pred_n: (B,) the L-BFGS prediction error ‖B·s − y‖/‖y‖ measured at
                     explicit steps (before the new pair enters): an accuracy signal for free
      failed_at:     (B,) int64, the step at which the request's parameters became non-finite even
                     with exact gradients, −1 while they are fine. A failed request is put back on
                     the cached path (``synced``), costs nothing more, and is reported as failed: the
                     other requests of its batch go on, unaffected
      err_bound:     (B,) float64 the error estimate's priced part: Σ over the approximate steps whose
                     interval an explicit step has measured of (Π ρ)·η·‖δ‖ (:mod:`.certificate`, eq. 1)
      err_open:      (B,) float64 Σ (Π ρ)·η·(|B|/|B'|)·‖B·v‖ over the approximate steps since the last
                     explicit step, awaiting the next measurement
      rate_last, rate_prev: (B,) float64 the last two measured ‖B·s − y‖/‖B·s‖ (0 before any)
      roundoff_sq:   (B,) float64 the square of the estimate's round-off part (accumulated in quadrature)
      secant:        the curvature approximate steps use when it is not the own history alone
                     (``config.curvature``): the batch's shared multi-secant model, or each request's
                     own pairs with the path's; None for ``"own"``
      path:          ``"own+path"``: the cached path's last points (their secant pairs)
    """

    W: Tensor
    history: Histories
    step: int
    synced: Tensor
    curvature: Tensor
    explicit_steps: Tensor
    approx_steps: Tensor
    fallbacks: Tensor
    skipped_pairs: Tensor
    gap: Tensor
    next_explicit: Tensor
    pred_max: Tensor
    pred_sum: Tensor
    pred_n: Tensor
    failed_at: Tensor
    err_bound: Tensor
    err_open: Tensor
    rate_last: Tensor
    rate_prev: Tensor
    roundoff_sq: Tensor
    secant: Histories | Secants | SharedPairs | None = None
    path: PathPairs | None = None

    @property
    def B(self) -> int:
        return int(self.W.shape[0])


COUNTERS = ("explicit_steps", "approx_steps", "fallbacks", "skipped_pairs")
_ESTIMATE = ("err_bound", "err_open", "rate_last", "rate_prev", "roundoff_sq")  # the error estimate's accumulators


@dataclass(frozen=True, eq=False)
class BatchedResult:
    """Final parameters (B, p) and per-request counters (B,) of a batched replay.

    ``error_estimate`` (B,): an estimate of ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_parent‖ from the replay's own
    measurements (:mod:`.certificate`; inf when the replay is not distinguishable from its parent);
    ``error_absolute`` (B,) its numerator, ≈ ‖θ_DG − θ_exact‖ (what chains compose,
    :func:`~.certificate.drift_estimate`); ``error_reliable`` (B,) bool and ``error_basis`` (one string
    per request): whether the estimate rests on the convex contraction it is derived from (for an MLP it
    does not: verify such replays by sampled exact retraining).
    """

    params: Tensor
    steps: int
    explicit_steps: Tensor
    approx_steps: Tensor
    fallbacks: Tensor
    skipped_pairs: Tensor
    prediction_error_max: Tensor
    prediction_error_mean: Tensor
    failed_at: Tensor
    error_estimate: Tensor
    error_absolute: Tensor
    error_reliable: Tensor
    error_basis: tuple[str, ...]

    def diagnostics(self, b: int) -> dict:
        return self.one(b).diagnostics()

    def one(self, b: int, trajectory: Trajectory | None = None) -> ReplayResult:
        """Request b's result."""
        return ReplayResult(self.params[b], self.steps, int(self.explicit_steps[b]), int(self.approx_steps[b]),
                            int(self.fallbacks[b]), int(self.skipped_pairs[b]), trajectory,
                            float(self.prediction_error_max[b]), float(self.prediction_error_mean[b]),
                            int(self.failed_at[b]), float(self.error_estimate[b]), float(self.error_absolute[b]),
                            bool(self.error_reliable[b]), self.error_basis[b])

    @classmethod
    def concat(cls, parts: Sequence[BatchedResult]) -> BatchedResult:
        first = parts[0]
        return cls(torch.cat([r.params for r in parts]), first.steps,
                   *(torch.cat([getattr(r, f) for r in parts])
                     for f in (*COUNTERS, "prediction_error_max", "prediction_error_mean", "failed_at",
                               "error_estimate", "error_absolute", "error_reliable")),
                   tuple(b for r in parts for b in r.error_basis))


@dataclass(frozen=True, eq=False)
class ReplayResult:
    """Outcome of one replay: final parameters, diagnostics, and the new trajectory if recorded.

    ``prediction_error_max`` / ``_mean``: how far the L-BFGS product was from the exact
    gradient difference at the explicit steps (0 = perfect, 1 = no better than predicting
    nothing). Values near 1 warn that approximate steps were inaccurate: use a smaller period,
    a longer history, or ``schedule="adaptive"``.

    ``error_estimate``: an estimate of ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_parent‖ (inf: the replay cannot
    be told apart from its parent), ``error_absolute`` its numerator, ``error_reliable`` / ``error_basis``
    whether it rests on the convex contraction it is derived from (:mod:`.certificate`). An exact result
    (an empty change, exact retraining) has 0 and basis ``"exact"``.
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
    failed_at: int = -1
    error_estimate: float = 0.0
    error_absolute: float = 0.0
    error_reliable: bool = True
    error_basis: str = "exact"

    def diagnostics(self) -> dict:
        return {"steps": self.steps, "explicit_steps": self.explicit_steps,
                "approx_steps": self.approx_steps, "fallbacks": self.fallbacks,
                "skipped_pairs": self.skipped_pairs,
                "prediction_error_max": round(self.prediction_error_max, 6),
                "prediction_error_mean": round(self.prediction_error_mean, 6),
                # None when not finite (JSON has no inf): the replay is not certified closer than its parent
                "error_estimate": float(f"{self.error_estimate:.4g}") if math.isfinite(self.error_estimate) else None,
                "error_absolute": float(f"{self.error_absolute:.4g}") if math.isfinite(self.error_absolute) else None,
                "error_reliable": self.error_reliable, "error_basis": self.error_basis}


class LocalRows:
    """The training rows a replay reads, held in this process (the default provider).

    A provider answers two questions: the features of some rows (the changed rows of the
    requests), and Σ ∇ℓ_i(w_b) over a step's cached batch for B parameter vectors — the explicit
    step's one pass over the data. The Ray backend's data-parallel mode answers them from data
    shards on other actors instead (:class:`deltagrad_ray.distributed.datashard.RemoteRows`).

    Args:
      model, data: the model and the rows.
      n_base: rows placed by the batch plan's permutation (the others were added later).
      gemm_dtype: precision of the explicit-step GEMMs (linear models; see the module docstring).
      gemm_bytes: memory budget of one explicit-step computation.
      batch_rows: rows of one cached batch (sizes the chunks of requests).
    """

    def __init__(self, model: FunctionalModel, data: Dataset, n_base: int, *, gemm_dtype: torch.dtype | None = None,
                 gemm_bytes: int = 1 << 30, batch_rows: int | None = None) -> None:
        self.model, self.data, self.n_base = model, data, n_base
        self.gather = RowGather(data.X)
        self.low = None
        if gemm_dtype is not None and gemm_dtype != data.X.dtype:
            if model.closed_form is None:
                raise InputError("gemm_dtype applies to the linear models (logreg, linear) only")
            self.low = gemm_dtype
            self.X_low = data.X.to(gemm_dtype)
            self.gather_low = RowGather(self.X_low)
        # memory of one request's explicit step ≈ rows × (activations per row, ~p/d) × 4 buffers
        width = max(1, model.p // max(1, data.n_features))
        per_request = max(1, batch_rows or n_base) * width * data.X.element_size() * 4
        self.chunk = max(1, gemm_bytes // per_request)
        self._extra: tuple[Tensor, Tensor, Tensor] | None = None

    def features(self, rows: Tensor) -> Tensor:
        return self.data.X[rows]

    def _extra_rows(self, extra: Tensor) -> tuple[Tensor, Tensor]:
        """Rows added by earlier changes: the same ones at every GD step, so gathered once."""
        if self._extra is None or not torch.equal(self._extra[0], extra):
            self._extra = (extra, self.data.X[extra], self.data.y[extra])
        return self._extra[1], self._extra[2]

    def grad_many(self, W: Tensor, base: Tensor | None, weights: Tensor | None, extra: Tensor,
                  w_t: Tensor) -> Tensor:
        """Σ over ``base`` rows (None: all base rows, weighted) and ``extra`` rows of ∇ℓ_i(w_b), (B, p)."""
        if base is None:
            X, y = self.data.X[: self.n_base], self.data.y[: self.n_base]
            X_low = self.X_low[: self.n_base] if self.low is not None else None
        else:
            X, y = self.gather(base), self.data.y[base]
            X_low = self.gather_low(base) if self.low is not None else None
        if self.low is None and W.shape[0] == 1:  # one request: the training kernel (a GEMV-like pass)
            G = self.model.grad_sum(W[0], X, y, weights)[None]
        else:
            ref = None
            if self.low is not None:
                ref = ManyRef(w_t, self.model.grad_sum(w_t, X, y, weights), X_low)
            G = torch.cat([self.model.grad_sum_many(W[i:i + self.chunk], X, y, weights, ref)
                           for i in range(0, W.shape[0], self.chunk)])
        if len(extra):
            Xe, ye = self._extra_rows(extra)
            G = G + (self.model.grad_sum(W[0], Xe, ye)[None] if W.shape[0] == 1
                     else self.model.grad_sum_many(W, Xe, ye))
        return G


def _group(keys: Tensor, values: Tensor) -> dict[int, Tensor]:
    """``values`` grouped by ``keys`` (one sort, not a mask per key)."""
    if len(values) == 0:
        return {}
    order = torch.argsort(keys, stable=True)
    uniq, counts = torch.unique_consecutive(keys[order], return_counts=True)
    return dict(zip(uniq.tolist(), torch.split(values[order], counts.tolist())))


class StepChanges(NamedTuple):
    """The requests' changed rows in one step's batch.

    Fields:
      X, y, w:   (B, r, d), (B, r), (B, r) the rows, padded; w = −1 deleted, +1 added, 0 padding
      changed:   (B,) bool, the request changes this batch
      delta:     (B, 1) rows added − rows deleted, in the data's dtype (|B'_t| = |B_t| + delta)
      min_delta: the smallest delta (a batch can lose all its rows only if |B_t| + min_delta ≤ 0)
      any:       some request changes this batch
    """

    X: Tensor
    y: Tensor
    w: Tensor
    changed: Tensor
    delta: Tensor
    min_delta: int
    any: bool


class _Entries:
    """Every request's changed rows as one table (features, label, ±1 for added/deleted, owner),
    and the :class:`StepChanges` of each step: once for GD (every step sees every row), once per
    epoch for SGD (the rows' batches in that epoch, one table per batch), so a step only looks up."""

    def __init__(self, replay: Replay, changes: Sequence[ChangeSet]) -> None:
        data, plan, dev = replay.data, replay.traj.plan, replay.data.X.device
        self.B, self.plan, self.dev = len(changes), plan, dev
        Xs, ys, signs, owners, base_rows, extra_ids, kinds = [], [], [], [], [], [], []
        nb = plan.n_base
        for b, ch in enumerate(changes):
            d = ch.delete.to(dev)
            Xs.append(replay.rows.features(d))
            ys.append(data.y[d])
            signs.append(torch.full((len(d),), -1.0, dtype=data.X.dtype, device=dev))
            owners.append(torch.full((len(d),), b, dtype=torch.int64, device=dev))
            base_rows.append(torch.where(d < nb, d, torch.full_like(d, -1)))
            extra_ids.append(torch.where(d >= nb, data.ids[d], torch.zeros_like(d)))
            kinds.append(d >= nb)
            if ch.add is not None and len(ch.add):
                a = ch.add.to(dtype=data.X.dtype, device=dev)
                Xs.append(a.X)
                ys.append(a.y)
                signs.append(torch.ones(len(a), dtype=data.X.dtype, device=dev))
                owners.append(torch.full((len(a),), b, dtype=torch.int64, device=dev))
                base_rows.append(torch.full((len(a),), -1, dtype=torch.int64, device=dev))
                extra_ids.append(a.ids.to(dev))
                kinds.append(torch.ones(len(a), dtype=torch.bool, device=dev))
        self.X, self.y = torch.cat(Xs), torch.cat(ys)
        self.sign, self.owner = torch.cat(signs), torch.cat(owners)
        self.base, self.ids, self.hashed = torch.cat(base_rows), torch.cat(extra_ids), torch.cat(kinds)
        # the entries placed by the plan's permutation and those placed by the hash of their id (fixed)
        plain = ~self.hashed
        self._plain = (plain, self.base[plain]) if bool(plain.any()) else None
        self._by_id = (self.hashed, self.ids[self.hashed]) if bool(self.hashed.any()) else None
        self._epoch = -1
        self._gather = RowGather(self.X)
        self._plain_chunk: tuple[int, Tensor] | None = None
        self._last_epoch = plan.locate(max(0, replay.traj.steps - 1))[0]
        self._none = self._table(torch.zeros(0, dtype=torch.int64, device=dev))
        self._gd = self._table(torch.arange(len(self.owner), device=dev)) if plan.full_batch else None

    EPOCH_CELLS = 1 << 20  # (epochs × plain rows) computed at once: the batches of up to this many

    def _plain_batches(self, epoch: int) -> Tensor:
        """The plan's batch of each plain entry in ``epoch``, computed for a run of epochs at once
        (one vectorised pass of the permutation instead of one per epoch)."""
        chunk = self._plain_chunk
        if chunk is None or not chunk[0] <= epoch < chunk[0] + len(chunk[1]):
            n_ep = max(1, min(64, self.EPOCH_CELLS // max(1, len(self._plain[1])), self._last_epoch + 1 - epoch))
            chunk = self._plain_chunk = (epoch, self.plan.batches_of_base_rows(self._plain[1],
                                                                               range(epoch, epoch + n_ep)))
        return chunk[1][epoch - chunk[0]]

    def _load_epoch(self, epoch: int) -> None:
        k = torch.empty(len(self.owner), dtype=torch.int64, device=self.dev)
        if self._plain is not None:
            k[self._plain[0]] = self._plain_batches(epoch).to(self.dev)
        if self._by_id is not None:
            k[self._by_id[0]] = self.plan.batch_of_added_ids(self._by_id[1], epoch).to(self.dev)
        self._by_k = self._tables_of_one(k) if self.B == 1 else {
            key: self._table(entries) for key, entries in _group(k, torch.arange(len(k), device=self.dev)).items()}
        self._epoch = epoch

    def _tables_of_one(self, k: Tensor) -> dict[int, StepChanges]:
        """One request's tables of an epoch: its entries sorted by batch once, each batch's entries a
        slice of them, in the entries' order (the tables :meth:`_table` gives). The rows themselves are
        gathered by :meth:`at`, just before the step reads them, into one reused buffer (a fresh one
        costs its page faults, rows gathered an epoch ahead are out of the cache by then), so a table is
        valid until the next call of :meth:`at`."""
        if len(k) == 0:
            return {}
        order = torch.argsort(k, stable=True)
        keys, counts = torch.unique_consecutive(k[order], return_counts=True)
        y, w = self.y[order], self.sign[order]
        ends = torch.cumsum(counts, 0)
        n_del = torch.cumsum((w < 0).to(torch.int64), 0)[ends - 1]
        n_del = torch.diff(n_del, prepend=n_del.new_zeros(1))
        true, dt, dev = torch.ones(1, dtype=torch.bool, device=self.dev), self.sign.dtype, self.dev
        out, lo = {}, 0
        for key, hi, nd in zip(keys.tolist(), ends.tolist(), n_del.tolist()):
            delta = (hi - lo) - 2 * nd
            # X holds the entries' positions until at() gathers their rows
            out[key] = StepChanges(order[lo:hi], y[None, lo:hi], w[None, lo:hi], true,
                                   torch.full((1, 1), delta, dtype=dt, device=dev), delta, True)
            lo = hi
        return out

    def _table(self, entries: Tensor) -> StepChanges:
        """The padded rows of some entries, with their counts."""
        B, dev = self.B, self.dev
        if B == 1:  # one request: its entries in order, no padding (the same table, in a few operations)
            w = self.sign[entries][None]
            n_del = int((w < 0).sum()) if len(entries) else 0
            delta = len(entries) - 2 * n_del
            return StepChanges(self.X[entries][None], self.y[entries][None], w,
                               torch.tensor([len(entries) > 0], device=dev),
                               torch.full((1, 1), delta, dtype=self.sign.dtype, device=dev), delta, len(entries) > 0)
        entries = entries[torch.argsort(self.owner[entries], stable=True)]
        owner = self.owner[entries]
        counts = torch.bincount(owner, minlength=B)
        r = int(counts.max()) if len(entries) else 0
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(len(entries), device=dev) - starts[owner]
        idx = torch.full((B, r), -1, dtype=torch.int64, device=dev)
        idx[owner, pos] = entries
        safe = idx.clamp(min=0)
        w = torch.where(idx >= 0, self.sign[safe], torch.zeros((), dtype=self.sign.dtype, device=dev))
        delta = w.sum(1)                            # +1 per added row, −1 per deleted one
        return StepChanges(self.X[safe], self.y[safe], w, counts > 0, delta[:, None],
                           int(delta.min()) if B else 0, len(entries) > 0)

    def at(self, t: int) -> StepChanges:
        if self._gd is not None:
            return self._gd
        epoch, k = self.plan.locate(t)
        if epoch != self._epoch:
            self._load_epoch(epoch)
        ch = self._by_k.get(k, self._none)
        if self.B == 1 and ch.any:  # the rows of the positions _tables_of_one left in X
            ch = ch._replace(X=self._gather(ch.X)[None])
        return ch


def _check_changes(traj: Trajectory, data: Dataset, changes: Sequence[ChangeSet], width: int) -> None:
    """Each change set must name rows of this trajectory not yet removed, and add rows of the
    right width; a request that does not is refused by index (:class:`RequestError`)."""
    n, removed = traj.n_rows, traj.removed
    active = n - (int(removed.sum()) if removed is not None else 0)
    reasons: dict[int, str] = {}
    for b, ch in enumerate(changes):
        d = ch.delete
        if d.dtype != torch.int64 or d.ndim != 1:
            reasons[b] = f"rows to delete must be a 1-D int64 tensor, got {d.dtype} of shape {tuple(d.shape)}"
            continue
        if len(d) and (int(d.min()) < 0 or int(d.max()) >= n):
            bad = int(d[(d < 0) | (d >= n)][0])
            reasons[b] = f"row {bad} is outside the trajectory's {n} rows"
            continue
        if len(d) > 1 and len(torch.unique(d)) != len(d):
            reasons[b] = "a row is deleted twice in the same request"
            continue
        try:
            check_not_removed(data.ids, d.to(data.ids.device), removed)
        except InputError as e:
            reasons[b] = str(e)
            continue
        n_add = 0 if ch.add is None else len(ch.add)
        if ch.add is not None and n_add and width and (ch.add.X.ndim != 2 or ch.add.X.shape[1] != width):
            reasons[b] = f"added rows have {ch.add.X.shape[-1]} features, the data has {width}"
            continue
        if len(d) >= active + n_add:
            reasons[b] = f"the request deletes every one of the {active} remaining rows"
    if reasons:
        raise RequestError(reasons)


class Replay:
    """B change sets replayed over one trajectory, in one pass.

    Args:
      model: the functional model the trajectory was trained with.
      traj: the cached trajectory (read only).
      data: the rows ``traj`` was trained on (``traj.n_rows`` of them; ``data.X`` may be zero-width
        when ``rows`` provides the features).
      changes: B change sets (e.g. from :func:`~.data.make_change_set` or :mod:`.requests`).
      config: :class:`~.config.DeltaGradConfig`.
      gemm_dtype: precision of the explicit-step GEMMs (linear models only); default: the data's.
      gemm_bytes: memory budget of one explicit-step computation; requests are processed in
        chunks that fit (an MLP's activations for B requests over all rows can be large).
      rows: where the training rows' features are read (default :class:`LocalRows` over ``data``).

    Raises:
      RequestError: when some change sets are invalid for this trajectory.
    """

    def __init__(self, model: FunctionalModel, traj: Trajectory, data: Dataset, changes: Sequence[ChangeSet],
                 config: DeltaGradConfig = DeltaGradConfig(), *, gemm_dtype: torch.dtype | None = None,
                 gemm_bytes: int = 1 << 30, rows=None) -> None:
        if len(data) != traj.n_rows:
            raise InputError(f"the trajectory was trained on {traj.n_rows} rows, the data has {len(data)}")
        if not changes:
            raise InputError("no change sets given")
        config = config.resolve(full_batch=traj.plan.full_batch, kind=None if model.spec is None else model.spec.kind)
        if config.curvature == "own+path" and not traj.plan.full_batch:
            raise InputError("curvature own+path needs a trajectory trained by gradient descent: with mini-batches the "
                             "cached path's secant pairs mix different batches' gradients (use own or shared)")
        # the features' width: the model's (the replay's rows may be zero-width when data shards hold them)
        width = model.spec.n_features if model.spec is not None else data.n_features
        _check_changes(traj, data, changes, width)
        self.model, self.traj, self.data, self.config = model, traj, data, config
        self.changes = list(changes)
        self.B, self.l2 = len(changes), traj.l2
        self.index = BatchIndex(traj.plan, data, traj.removed)  # the cached batches, shared by all
        self.explicit = config.explicit_steps(traj.steps).tolist()
        self.adaptive = config.schedule == "adaptive"
        self.rows = rows if rows is not None else LocalRows(
            model, data, traj.plan.n_base, gemm_dtype=gemm_dtype, gemm_bytes=gemm_bytes,
            batch_rows=traj.plan.batch_size)
        self.entries = _Entries(self, changes)
        # the error estimate's safety factor c (per optimizer) and one unit of round-off of a step's update
        self._safety = certificate.safety(traj.plan.full_batch)
        self._unit = certificate.ROUNDOFF * torch.finfo(traj.dtype).eps
        # one request and a fixed schedule: approximate steps take _approximate_one
        self._one = self.SINGLE_FAST_PATH and self.B == 1 and not self.adaptive
        self._one_key: tuple | None = None   # (history, σ, usable, norm bound) as numbers, per history
        self._one_curv: tuple | None = None  # (curvature tensor, L̂ as a number)

    # -- state --------------------------------------------------------------------------------
    def start(self) -> ReplayState:
        """The state before step 0: w^I_0 = w_0 for every request."""
        t, B, dev = self.traj, self.B, self.traj.initial.device
        hist = lbfgs.empty(B, self.config.history, t.p, t.dtype, dev, self.config.sigma)
        zeros = torch.zeros(B, dtype=torch.int64, device=dev)
        fz = torch.zeros(B, dtype=torch.float64, device=dev)
        return ReplayState(t.initial.expand(B, t.p).clone(), hist, 0, torch.ones(B, dtype=torch.bool, device=dev),
                           fz.clone(), zeros, zeros.clone(), zeros.clone(), zeros.clone(),
                           torch.full((B,), self.config.period, dtype=torch.int64, device=dev),
                           torch.full((B,), self.config.burn_in, dtype=torch.int64, device=dev),
                           fz.clone(), fz.clone(), zeros.clone(), torch.full((B,), -1, dtype=torch.int64, device=dev),
                           *(fz.clone() for _ in range(5)),
                           secant=lbfgs.shared_empty(t.p, dev, self.config.shared_rtol)
                           if self.config.curvature == "shared" else
                           lbfgs.secants_empty(B, self.config.shared_history, t.p, dev, self.config.shared_rtol)
                           if self.config.curvature == "secant" else None,
                           path=lbfgs.path_empty(t.p, t.dtype, dev) if self.config.curvature == "own+path" else None)

    # -- the pieces of a step -------------------------------------------------------------------
    def _products(self, history: Histories, secant, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B·v_b, ‖B·v_b‖/‖v_b‖, usable) with the curvature ``config.curvature`` names: the own
        compact form, the own pairs with the path's, or the batch's shared multi-secant model."""
        if self.config.curvature == "shared":
            return lbfgs.shared_hvp(secant, V)
        if self.config.curvature == "secant":
            return lbfgs.secants_hvp(secant, V)
        return lbfgs.hvp(history if secant is None else secant, V)

    def _approximate(self, st: ReplayState, V: Tensor, lr: float) -> tuple[Tensor, Tensor, Tensor]:
        """(B·v_b, accepted, ‖B·v_b‖ float64) — Alg. 1, line 10, behind every guard: a usable compact
        form within its norm bound (:func:`~.lbfgs.hvp`), within κ·L̂ (and the known bound L), and
        non-expansive (η‖Bv‖² ≤ 2·vᵀBv; see :class:`~.config.DeltaGradConfig`)."""
        Bv, ratio, usable = self._products(st.history, st.secant, V)
        Bd, Vd = Bv.double(), V.double()
        bb = (Bd * Bd).sum(1)
        return Bv, self._accepts(usable, ratio, st.curvature, lr, bb, (Vd * Bd).sum(1)), bb.sqrt()

    def _accepts(self, usable, ratio, curvature, lr: float, bb, vb):
        """The guards of an approximate step, for tensors (B,) or numbers: a usable product within
        κ·L̂ (and the known bound L) whose step is non-expansive, η‖Bv‖² ≤ 2·vᵀBv."""
        cfg = self.config
        limit = cfg.curvature_guard * curvature
        if cfg.max_curvature is not None:
            limit = limit.clamp(max=cfg.max_curvature) if isinstance(limit, Tensor) else min(limit, cfg.max_curvature)
        return usable & (ratio <= limit) & (lr * bb <= (2 * (1 + 1e-12)) * vb)

    SINGLE_FAST_PATH = True  # one request's approximate steps by :meth:`_approximate_one` (tests turn it off)

    def _approximate_one(self, st: ReplayState, t: int, sb: StepBatch, ch: StepChanges, w_t: Tensor,
                         g_t: Tensor, lr: float, unit: float | None,
                         recorders: Sequence[Recorder | None] | None) -> ReplayState | None:
        """Step t of a single request off the cached path as an approximate step (Alg. 1, lines 9-11)
        with the error estimate's step: :meth:`_step`'s arithmetic and guards, without its batching.
        One request's approximate step is a few small vector operations and the changed rows' gradient,
        so the batched form's ~85 tensor operations (masks, selections, per-request counters) cost
        more than the arithmetic; this takes about 35. None where the batch lost every row, a guard
        refuses the approximation or the step is not finite: :meth:`_step` then takes the step as usual
        (an explicit one) and says why in its counters."""
        size, cfg = sb.size, self.config
        den = size + ch.min_delta                   # |B'_t|: B = 1, so min_delta is the request's delta
        if den <= 0:
            return None
        W = st.W
        V = W - w_t
        if cfg.curvature == "own":   # B·v = σv − Wᵀ M⁻¹ W v (lbfgs.hvp, one request)
            h = st.history
            if self._one_key is None or self._one_key[0] is not h:
                sigma, ok, bound = torch.stack([h.sigma[0], h.ok[0].double(), h.bound[0]]).tolist()
                self._one_key = (h, sigma, ok > 0, bound)
            _, sigma, ok, bound = self._one_key
            if not ok:
                return None
            Vd = V[0].double()
            Bvd = lbfgs.hvp_one(h, Vd, sigma)
            Bv = Bvd.to(V.dtype)
            Bd = Bv.double()
            nb2, vv, bb, vb = torch.stack([Bvd.dot(Bvd), Vd.dot(Vd), Bd.dot(Bd), Vd.dot(Bd)]).tolist()
            nb, nv = math.sqrt(nb2), max(math.sqrt(vv), 1e-300)
            usable, ratio = lbfgs.within_bound(nb, nv, bound), nb / nv
        else:
            Bv2, ratio2, usable2 = self._products(st.history, st.secant, V)
            Bv, Bd, Vd = Bv2[0], Bv2[0].double(), V[0].double()
            ratio, usable, bb, vb = torch.stack([ratio2[0], usable2[0].double(), Bd.dot(Bd), Vd.dot(Bd)]).tolist()
            usable = usable > 0
        if self._one_curv is None or self._one_curv[0] is not st.curvature:
            self._one_curv = (st.curvature, float(st.curvature[0]))
        curvature = self._one_curv[1]
        if not self._accepts(usable, ratio, curvature, lr, bb, vb):  # NaN anywhere fails them all
            return None
        w = W[0]
        l2W = self.l2 * w
        G = size * ((g_t + Bv) - l2W)
        if ch.any:
            G = G + self.model.grad_sum(w, ch.X[0], ch.y[0], ch.w[0])
        g = G / den + l2W
        w_next = w - lr * g
        if not math.isfinite(float(w_next.sum())):
            return None
        _record(recorders, t, W, g[None])
        # the error estimate's step (_estimate)
        if unit is None:
            unit = self._unit * (float(w_t.double().norm()) + lr * float(g_t.double().norm()))
        err_open, err_bound, roundoff_sq = certificate.advance(
            st.err_open, st.err_bound, st.roundoff_sq, certificate.contraction(lr, self.l2, curvature),
            ((lr * size) / den) * math.sqrt(bb), unit * unit)
        path = None if st.path is None else st.path.add(w_t, g_t, cfg.path_pairs + 1)
        return st.replace(W=w_next[None], step=t + 1, approx_steps=st.approx_steps + 1, path=path,
                          err_open=err_open, err_bound=err_bound, roundoff_sq=roundoff_sq)

    def _explicit(self, mask: Tensor, st: ReplayState, V: Tensor, sb: StepBatch, w_t: Tensor, g_t: Tensor,
                  G: Tensor, full: Tensor, t: int, track: dict) -> tuple[Tensor, Tensor]:
        """Explicit steps (Alg. 1, lines 5-7) for the requests in ``mask``, in one computation over
        the rows; updates ``track`` (history, curvature, counters, prediction error, adaptive gap)."""
        cfg = self.config
        W = st.W
        every = bool(mask.all())  # every request explicit (a scheduled step): no selecting and scattering
        idx = None if every else torch.nonzero(mask).reshape(-1)
        base, weights = self.index.base(sb)
        Wx = W if every else W[idx]
        Gx = self.rows.grad_many(Wx, base, weights, sb.extra, w_t)
        fx = Gx / sb.size + self.l2 * Wx if sb.size else self.l2 * Wx
        if every:
            G, full, s, y = Gx, fx, V, fx - g_t
        else:
            G, full = G.clone(), full.clone()
            G[idx], full[idx] = Gx, fx
            s = torch.zeros_like(W)
            y = torch.zeros_like(W)
            s[idx], y[idx] = V[idx], fx - g_t

        def where(update: Tensor, old: Tensor) -> Tensor:  # the new value for the requests in mask
            return update if every else torch.where(mask, update, old)

        hist = track["history"]
        # how good would the approximation have been? (before the new pair enters)
        pred, _, usable = self._products(hist, track["secant"], s)
        measured = mask & usable
        pd, sd, yd = pred.double(), s.double(), y.double()
        miss, ns, ny = (pd - yd).norm(dim=1), sd.norm(dim=1), yd.norm(dim=1)
        e = miss / ny.clamp_min(1e-300)
        e = torch.where(measured, e, torch.zeros_like(e))
        track["pred_max"] = torch.where(measured, torch.maximum(track["pred_max"], e), track["pred_max"])
        track["pred_sum"] = track["pred_sum"] + e
        track["pred_n"] = track["pred_n"] + measured
        # the error estimate (certificate.py): this measurement prices the approximate steps since the
        # request's last explicit step, which used the very model measured here; relative to ‖B·s‖, the
        # scale the approximate steps know (‖B·v‖). Unmeasurable (the model unusable at s): as if no
        # better than predicting nothing.
        rate = miss / pd.norm(dim=1).clamp_min(1e-300)
        rate = torch.where(measured, rate, torch.maximum(track["rate_last"], torch.ones_like(rate)))
        priced = self._safety * torch.maximum(rate, track["rate_last"]) * track["err_open"]
        track["err_bound"] = where(track["err_bound"] + priced, track["err_bound"])
        track["err_open"] = where(torch.zeros_like(rate), track["err_open"])
        track["rate_prev"] = where(track["rate_last"], track["rate_prev"])
        track["rate_last"] = where(rate, track["rate_last"])
        if self.adaptive and t >= cfg.burn_in:
            tol, gap = cfg.adaptive_tol, track["gap"]
            new_gap = torch.where(e > tol, (gap // 2).clamp(min=1),
                                  torch.where(e < tol / 4, (gap * 2).clamp(max=cfg.period), gap))
            track["gap"] = torch.where(measured, new_gap, gap)
            track["next_explicit"] = torch.where(mask, t + track["gap"], track["next_explicit"])
        ok = mask & lbfgs.curvature_ok(sd, yd, cfg.curvature_eps, ns, ny)
        track["skipped_pairs"] = track["skipped_pairs"] + (mask & ~ok)
        track["history"] = lbfgs.push(hist, s, y, ok)
        if cfg.curvature == "shared":
            track["secant"] = lbfgs.shared_add(track["secant"], s, y, ok, t, cfg.shared_history)
        elif cfg.curvature == "secant":
            track["secant"] = lbfgs.secants_push(track["secant"], s, y, ok)
        elif cfg.curvature == "own+path":
            track["secant"] = lbfgs.with_path_pairs(track["history"], *track["path"].pairs(cfg.curvature_eps))
        track["curvature"] = torch.where(ok, torch.maximum(track["curvature"], ny / ns.clamp_min(1e-300)),
                                         track["curvature"])
        track["explicit_steps"] = track["explicit_steps"] + mask
        return G, full

    def _step(self, st: ReplayState, t: int, w_t: Tensor, g_t: Tensor, lr: float,
              recorders: Sequence[Recorder | None] | None, unit: float | None = None) -> ReplayState:
        """One step of every request; ``unit``: the step's round-off unit (default: computed here)."""
        sb = self.index.at(t)
        ch = self.entries.at(t)
        if self._one and not self.explicit[t] and not bool(st.synced[0]):
            nxt = self._approximate_one(st, t, sb, ch, w_t, g_t, lr, unit, recorders)
            if nxt is not None:
                return nxt
        W = st.W
        path = None if st.path is None else st.path.add(w_t, g_t, self.config.path_pairs + 1)
        # requests still synced (w^I_t == w_t) whose batch is unchanged reuse the cached step as is
        keep = st.synced & ~ch.changed if bool(st.synced.any()) else None
        if keep is not None and bool(keep.all()):
            _record(recorders, t, W, g_t.expand_as(W))
            return st.replace(W=W - lr * g_t, step=t + 1, path=path)
        if keep is not None and not bool(keep.any()):
            keep = None
        l2, size = self.l2, sb.size
        V = W - w_t
        active = ~st.synced                        # requests off the cached path (v ≠ 0)
        track = {k: getattr(st, k) for k in ("history", "curvature", *COUNTERS, "gap", "next_explicit",
                                             "pred_max", "pred_sum", "pred_n", "secant", *_ESTIMATE)}
        track["path"] = path
        full = g_t.expand_as(W)                    # ∇F_{B_t}(w_b): exact for synced requests (v = 0)
        scheduled = bool(self.explicit[t])
        if self.adaptive:
            due = st.next_explicit <= t
            need, approx = active & due if not scheduled else active, active & ~due if not scheduled else None
        else:
            need, approx = (active, None) if scheduled else (None, active)
        take = norm_bv = None
        if approx is not None and bool(approx.any()):
            Bv, accepted, norm_bv = self._approximate(st, V, lr)
            take = approx & accepted
            full = torch.where(take[:, None], g_t + Bv, full)
            refused = approx & ~take
            track["approx_steps"] = track["approx_steps"] + take
            track["fallbacks"] = track["fallbacks"] + refused
            need = refused if need is None else need | refused
        l2W = l2 * W
        G = size * (full - l2W)                    # Σ over the cached batch (exact after explicit steps)
        # the changed rows' gradient first, while their rows are in the cache (an explicit step's pass
        # over the batch evicts them; measured at SGD's explicit steps: 0.42-0.46 ms before it, 0.53-0.57 after)
        corr = self.model.grad_sum_each(W, ch.X, ch.y, ch.w) if ch.any else None
        if need is not None and bool(need.any()):
            G, full = self._explicit(need, st, V, sb, w_t, g_t, G, full, t, track)
        den = size + ch.delta                       # |B'_t| per request
        if size + ch.min_delta > 0:
            data_term = lambda num: num / den  # noqa: E731
        else:  # a batch that lost all its rows contributes no data gradient (see train.py)
            data_term = lambda num: torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))  # noqa: E731

        def gradient(G: Tensor) -> Tensor:
            g = data_term(G if corr is None else G + corr) + l2W
            return g if keep is None else torch.where(keep[:, None], g_t, g)

        g = gradient(G)
        W_next = W - lr * g
        # one reduction screens for NaN/inf (as training does); a sum that merely overflows finds nothing below
        if not math.isfinite(float(W_next.sum())):
            finite = torch.isfinite(W_next).all(dim=1)
            bad = ~finite & active & (~need if need is not None else True)
            if bool(bad.any()):  # an approximation produced inf/NaN: redo those steps explicitly
                take = None if take is None else take & ~bad
                track["approx_steps"] = track["approx_steps"] - bad
                track["fallbacks"] = track["fallbacks"] + bad
                G, full = self._explicit(bad, st, V, sb, w_t, g_t, G, full, t, track)
                g = torch.where(bad[:, None], gradient(G), g)
                W_next = torch.where(bad[:, None], W - lr * g, W_next)
                finite = torch.isfinite(W_next).all(dim=1)
            if not bool(finite.all()):  # non-finite with exact gradients: the request fails here
                failed = ~finite
                track["failed_at"] = torch.where(failed, t, st.failed_at)
                W_next = torch.where(failed[:, None], w_t - lr * g_t, W_next)  # back on the cached path
                keep = failed if keep is None else keep | failed
        _record(recorders, t, W, g)
        if unit is None:
            unit = self._unit * (float(w_t.double().norm()) + lr * float(g_t.double().norm()))
        self._estimate(track, lr, size, unit, active, take, norm_bv, den, size + ch.min_delta > 0)
        synced = keep if keep is not None else st.synced & ~ch.changed if ch.any else st.synced
        return ReplayState(W_next, track["history"], t + 1, synced, track["curvature"], track["explicit_steps"],
                           track["approx_steps"], track["fallbacks"], track["skipped_pairs"], track["gap"],
                           track["next_explicit"], track["pred_max"], track["pred_sum"], track["pred_n"],
                           track.get("failed_at", st.failed_at), *(track[k] for k in _ESTIMATE),
                           track["secant"], path)

    def _estimate(self, track: dict, lr: float, size: int, unit: float, active: Tensor,
                  take: Tensor | None, norm_bv: Tensor | None, den: Tensor, den_ok: bool) -> None:
        """Step t of the error estimate (certificate.py, eq. 1): both parts contract by ρ_t; an accepted
        approximate step adds η·(|B|/|B'|)·‖B·v‖ to the open part (a batch left with no rows has an exact,
        data-free gradient); every request off the cached path adds its step's round-off, in quadrature
        (independent rounding errors: the probabilistic model of Higham & Mary 2019)."""
        rho = certificate.contraction(lr, self.l2, track["curvature"])
        opened = 0.0
        if take is not None:
            dd = den[:, 0].double()
            scale = (lr * size) / dd if den_ok else torch.where(dd > 0, (lr * size) / dd.clamp(min=1), 0.0)
            opened = torch.where(take, scale * norm_bv, 0.0)
        track["err_open"], track["err_bound"], track["roundoff_sq"] = certificate.advance(
            track["err_open"], track["err_bound"], track["roundoff_sq"], rho, opened,
            active.to(rho.dtype) * (unit * unit))

    # -- segments and whole replays ---------------------------------------------------------------
    def run_segment(self, st: ReplayState, seg: Segment,
                    recorders: Sequence[Recorder | None] | None = None) -> ReplayState:
        """Advance ``st`` over the steps of ``seg`` (which must start at ``st.step``); ``recorders[b]``,
        if given, receives request b's (w^I_t, ĝ_t) of every step (online mode)."""
        if seg.start != st.step:
            raise ValueError(f"segment starts at step {seg.start}, the replay is at step {st.step}")
        if st.B != self.B:
            raise ValueError(f"the state holds {st.B} requests, this replay {self.B}")
        lrs = seg.lrs.tolist()
        # each step's round-off unit ROUNDOFF·u·(‖w_t‖ + η_t‖g_t‖) (certificate.py), for the whole segment at once
        units = (self._unit * (_row_norms(seg.params)
                               + seg.lrs.to(device=seg.params.device, dtype=torch.float64)
                               * _row_norms(seg.grads))).tolist()
        for i in range(seg.stop - seg.start):
            st = self._step(st, seg.start + i, seg.params[i], seg.grads[i], lrs[i], recorders, units[i])
        return st

    def run(self, state: ReplayState | None = None,
            recorders: Sequence[Recorder | None] | None = None) -> ReplayState:
        """Replay every remaining step of the trajectory, from ``state`` (default: the start)."""
        st = state or self.start()
        for seg in self.traj.segments(st.step):
            st = self.run_segment(st, seg, recorders)
        return st

    def certificate(self, st: ReplayState) -> certificate.Certificate:
        """The error estimate of a finished replay (:mod:`.certificate`), NaN for failed requests."""
        return state_certificate(st, self.traj.final, kind=None if self.model.spec is None else self.model.spec.kind,
                                 max_lr=float(self.traj.lrs.max()), full_batch=self.traj.plan.full_batch)

    def result(self, st: ReplayState) -> BatchedResult:
        """The final parameters and counters (NaN parameters for requests that failed)."""
        W = torch.where((st.failed_at >= 0)[:, None], float("nan"), st.W)
        cert = self.certificate(st)
        return BatchedResult(W, self.traj.steps, st.explicit_steps, st.approx_steps, st.fallbacks,
                             st.skipped_pairs, st.pred_max, st.pred_sum / st.pred_n.clamp(min=1), st.failed_at,
                             cert.ratio, cert.absolute, cert.reliable, cert.basis)


def state_certificate(st: ReplayState, final: Tensor, *, kind: str | None, max_lr: float,
                      full_batch: bool) -> certificate.Certificate:
    """The error estimate of finished replay states (:mod:`.certificate`), NaN for failed requests.

    Needs only the parent's final parameters ``final``, the model's ``kind`` (None: another module),
    the trajectory's largest learning rate and its optimizer, so a driver that holds no trajectory
    (the Ray backend) prices its actors' states itself."""
    moved = (st.W.double() - final.to(st.W.device).double()).norm(dim=1)
    cert = certificate.certify(st.err_bound, st.err_open, st.rate_last, st.rate_prev, st.roundoff_sq.sqrt(), moved,
                               safety=certificate.safety(full_batch), kind=kind, max_lr=max_lr,
                               curvature=st.curvature)
    failed = st.failed_at >= 0
    return cert._replace(absolute=torch.where(failed, math.nan, cert.absolute),
                         ratio=torch.where(failed, math.nan, cert.ratio), reliable=cert.reliable & ~failed)


def failure_reason(step: int) -> str:
    """Why a request whose parameters became non-finite at ``step`` failed (one message everywhere)."""
    return (f"the replay produced non-finite parameters at step {step}, with exact gradients too: the change "
            "set holds values the model cannot take (check the rows' features for extreme values)")


def _row_norms(x: Tensor) -> Tensor:
    """‖x_i‖ of each row of a (k, p) tensor in float64, a few MiB of rows at a time (a float32 segment
    cast whole to float64 would double its memory)."""
    rows = max(1, (1 << 22) // max(x.shape[1], 1))
    return torch.cat([torch.linalg.vector_norm(x[i:i + rows].double(), dim=1)
                      for i in range(0, len(x), rows)]) if len(x) else x.new_zeros(0, dtype=torch.float64)


def _record(recorders, t: int, W: Tensor, g: Tensor) -> None:
    if recorders is not None:
        for b, rec in enumerate(recorders):
            if rec is not None:
                rec.record(t, W[b], g[b])


# -- the public functions ----------------------------------------------------------------------------
def deltagrad(model: FunctionalModel, traj: Trajectory, data: Dataset, change: ChangeSet,
              config: DeltaGradConfig = DeltaGradConfig(), *, record: bool = False,
              recorder: Recorder | None = None) -> ReplayResult:
    """Parameters after ``change``, replayed from ``traj`` with DeltaGrad (one request).

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
    rec = recorder
    if rec is None and record:
        rec = MemoryRecorder(traj.steps, traj.p, traj.dtype, traj.initial.device)
    try:
        rp = Replay(model, traj, data, [change], config)
    except RequestError as e:
        raise InputError(e.reasons[0]) from None
    st = rp.run(recorders=None if rec is None else [rec])
    if int(st.failed_at[0]) >= 0:
        raise InputError(failure_reason(int(st.failed_at[0])))
    new_traj = None if rec is None else changed_trajectory(traj, data, change, st.W[0], rec)
    return rp.result(st).one(0, new_traj)


def deltagrad_batched(model: FunctionalModel, traj: Trajectory, data: Dataset, changes: Sequence[ChangeSet],
                      config: DeltaGradConfig = DeltaGradConfig(), *, batch_size: int = 32,
                      gemm_dtype: torch.dtype | None = None, batches_per_pass: int | None = None,
                      progress: Callable[[int], None] | None = None) -> BatchedResult:
    """Replay many change sets: batches of ``batch_size`` requests; ``batches_per_pass``
    batches (default: all) advance together over one pass of the trajectory, so each cache
    segment is read once per pass.

    Args:
      changes: the change sets, e.g. :func:`~.requests.leave_one_out`.
      batch_size: requests per batch (B).
      gemm_dtype: see :class:`Replay`.
      batches_per_pass: batches sharing one pass (fewer: less memory, more reads).
      progress: called with the number of requests finished after each pass.

    Returns:
      :class:`BatchedResult` in the order of ``changes``.

    Example:
      >>> from deltagrad_ray.core import *
      >>> data = synthetic_classification(300, 5, 3, seed=0)
      >>> m = ModelSpec("logreg", 5, 3).build()
      >>> traj = train(m, data, steps=30, lrs=learning_rates(30, 0.5), l2=0.01)
      >>> res = deltagrad_batched(m, traj, data, leave_one_out(data, data.ids[:10]))
      >>> res.params.shape
      torch.Size([10, 18])
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be an integer >= 1, got {batch_size!r}")
    bounds = list(range(0, len(changes), batch_size))
    per_pass = batches_per_pass or len(bounds)
    results: list[BatchedResult] = []
    for p0 in range(0, len(bounds), per_pass):
        runs = [Replay(model, traj, data, changes[i:i + batch_size], config, gemm_dtype=gemm_dtype)
                for i in bounds[p0:p0 + per_pass]]
        states = [r.start() for r in runs]
        for seg in traj.segments():
            states = [r.run_segment(s, seg) for r, s in zip(runs, states)]
        results += [r.result(s) for r, s in zip(runs, states)]
        if progress is not None:
            progress(sum(r.B for r in runs))
    if not results:
        raise InputError("no change sets given")
    return BatchedResult.concat(results)


def retrain_batched(model: FunctionalModel, traj: Trajectory, data: Dataset, changes: Sequence[ChangeSet], *,
                    batch_size: int = 32, gemm_dtype: torch.dtype | None = None) -> Tensor:
    """Exact retraining for many change sets, B models per pass over the rows: (N, p).

    The ground truth done the way a careful user would batch it, with the explicit steps' own kernel
    (one GEMM of each cached batch's rows against B parameter vectors, the changed rows corrected
    per request) at every step, and no curvature at all: the baseline DeltaGrad's many-request
    speed-up is measured against (``benchmarks.many``). Equal to :func:`~.train.retrain` of each
    request up to summation order (tested).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be an integer >= 1, got {batch_size!r}")
    out = []
    for i in range(0, len(changes), batch_size):
        rp = Replay(model, traj, data, changes[i:i + batch_size], gemm_dtype=gemm_dtype)
        W, l2 = traj.initial.expand(rp.B, traj.p).clone(), traj.l2
        for seg in traj.segments():
            lrs = seg.lrs.tolist()
            for j in range(seg.stop - seg.start):
                t = seg.start + j
                sb, ch = rp.index.at(t), rp.entries.at(t)
                base, weights = rp.index.base(sb)
                G = rp.rows.grad_many(W, base, weights, sb.extra, seg.params[j])
                if ch.any:
                    G = G + model.grad_sum_each(W, ch.X, ch.y, ch.w)
                den = sb.size + ch.delta
                g = torch.where(den > 0, G / den.clamp(min=1), torch.zeros_like(G)) + l2 * W
                W = W - lrs[j] * g
        out.append(W)
    if not out:
        raise InputError("no change sets given")
    return torch.cat(out)


def deltagrad_online(model: FunctionalModel, traj: Trajectory, data: Dataset,
                     deletions: list[Tensor], config: DeltaGradConfig = DeltaGradConfig(),
                     n_classes: int | None = None) -> ReplayResult:
    """Apply deletion requests one after another; each replayed path becomes the next cache.

    Args:
      deletions: a list of id tensors, applied in order.

    Returns:
      The last :class:`ReplayResult`; its ``trajectory`` is the final cache (over the same
      ``data``, with the deleted rows flagged) and its counters are summed over all requests. Its
      error estimate is the chain's (:func:`~.certificate.drift_estimate`): ``error_absolute`` ≈
      ‖θ_k − θ_exact,k‖ and ``error_estimate`` ≈ that over ‖θ_exact,k − θ_base‖, where θ_exact,k is
      exact retraining from ``traj`` without every id deleted, and θ_base = ``traj.final``.
    """
    if not deletions:
        raise InputError("no deletion requests given")
    totals = dict.fromkeys(COUNTERS, 0)
    worst = 0.0
    res = None
    base, first = traj, None
    absolutes, bases = [], []
    for ids in deletions:
        change = make_change_set(data, delete_ids=ids, removed=traj.removed, n_classes=n_classes)
        res = deltagrad(model, traj, data, change, config, record=True)
        for k in totals:
            totals[k] += getattr(res, k)
        worst = max(worst, res.prediction_error_max)
        absolutes.append(res.error_absolute)
        bases.append(res.error_basis)
        traj = res.trajectory
        first = first or traj
    drift = certificate.drift_estimate(absolutes, float((res.params - base.final).double().norm()),
                                       growth=_size_growth(first, traj, data))
    basis = certificate.worst_basis(bases)
    return replace(res, **totals, prediction_error_max=worst, error_estimate=drift.ratio,
                   error_absolute=drift.absolute, error_reliable=basis in certificate.RELIABLE, error_basis=basis)


def _size_growth(first: Trajectory, last: Trajectory, data: Dataset) -> float:
    """max over steps of |B_t| after the first version / |B_t| after the last one (≥ 1): how much a
    gradient error of an early version grows when later versions divide by fewer rows."""
    a, b = BatchIndex(first.plan, data, first.removed), BatchIndex(last.plan, data, last.removed)
    growth = 1.0
    for t in range(1 if first.plan.full_batch else first.steps):
        na, nb = a.at(t).size, b.at(t).size
        if nb > 0:  # a batch left with no rows has a data-free, exact gradient
            growth = max(growth, na / nb)
    return growth


def relative_error(approx: Tensor, exact: Tensor, reference: Tensor) -> float:
    """‖approx − exact‖ / ‖exact − reference‖: DeltaGrad's error against the deletion's effect."""
    den = float((exact - reference).norm())
    return float((approx - exact).norm()) / den if den > 0 else math.inf
