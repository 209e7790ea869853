"""Batched DeltaGrad: B independent change sets replayed in one pass over a trajectory.

Each request keeps its own parameters, L-BFGS history, curvature estimate and counters, as
in :mod:`.replay`; what they share is the work:

* **explicit steps** of all requests needing one at step t are one computation over the
  cached batch's rows — a GEMM of the rows against B parameter vectors for the linear models
  (``vmap`` otherwise) — instead of B passes over the data (the research code's pitfall 7);
* **approximate steps** are vectorised: B compact-form L-BFGS products as batched mat-vecs
  and one batched 2m × 2m LU solve;
* each request's changed rows (deleted or added) are gathered into one padded (B, r, d)
  tensor and corrected with one batched computation.

The results equal a loop of single replays (:class:`~.replay.Replay`) up to floating-point
summation order. With ``gemm_dtype=torch.float32`` on float64 data, the explicit-step GEMMs
run in difference form — X·(w_b − w_t) in float32 around a float64 reference — which doubles
the GEMM rate on CPUs at a relative error of ~1e-7 on the (small) differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .batches import BatchIndex
from .data import ChangeSet, Dataset
from .errors import InputError
from .lbfgs import SIGMA_RULES
from .models import FunctionalModel, ManyRef
from .replay import DeltaGradConfig
from .train import RowGather
from .trajectory import Segment, Trajectory


class BatchedHistory(NamedTuple):
    """L-BFGS histories of B requests with the compact form prepared.

    Fields:
      S, Y:   (B, m, p) pairs; a request's ``count`` valid pairs sit in the last slots,
              oldest first; unused slots are zero
      count:  (B,) int64 valid pairs
      sigma:  (B,) float64 σ of B_0 = σI
      Wc:     (B, 2m, p) float64 [σS; Y]
      LU, piv: batched LU factors of the (B, 2m, 2m) middle matrices (unused slots → identity)
      ok:     (B,) bool, the factorisation is usable
      bound:  (B,) float64 σ + Σ‖y‖²/(sᵀy), the BFGS norm bound
    """

    S: Tensor
    Y: Tensor
    count: Tensor
    sigma: Tensor
    Wc: Tensor
    LU: Tensor
    piv: Tensor
    ok: Tensor
    bound: Tensor


def _prepare(S: Tensor, Y: Tensor, count: Tensor, rule: str) -> BatchedHistory:
    """Byrd, Nocedal & Schnabel (1994), Thm. 2.3, for B histories at once."""
    B, m, p = S.shape
    Sd, Yd = S.double(), Y.double()
    SY, SS = torch.bmm(Sd, Yd.transpose(1, 2)), torch.bmm(Sd, Sd.transpose(1, 2))
    s, y = Sd[:, -1], Yd[:, -1]
    sy, ss, yy = (s * y).sum(-1), (s * s).sum(-1), (y * y).sum(-1)
    has = count > 0
    sigma = torch.where(has, (sy / ss.clamp_min(1e-300)) if rule == "sy/ss" else (yy / sy.where(has, 1.0)),
                        torch.ones_like(sy))
    L = torch.tril(SY, diagonal=-1)
    D = torch.diag_embed(torch.diagonal(SY, dim1=1, dim2=2))
    M = torch.cat([torch.cat([sigma[:, None, None] * SS, L], 2), torch.cat([L.transpose(1, 2), -D], 2)], 1)
    unused = torch.arange(m, device=S.device)[None, :] < (m - count)[:, None]     # (B, m)
    pad = torch.cat([unused, unused], dim=1).to(M.dtype)                           # (B, 2m)
    M = M + torch.diag_embed(pad)  # unused slots: zero rows/columns become identity
    LU, piv, info = torch.linalg.lu_factor_ex(M)
    ok = has & (info == 0) & torch.isfinite(LU).flatten(1).all(1)
    d = torch.diagonal(SY, dim1=1, dim2=2)
    ratio = torch.where(unused, torch.zeros_like(d), (Yd ** 2).sum(-1) / torch.where(unused, 1.0, d))
    bound = sigma + ratio.sum(-1)
    Wc = torch.cat([sigma[:, None, None] * Sd, Yd], dim=1)
    return BatchedHistory(S, Y, count, sigma, Wc, LU, piv, ok, bound)


def empty_histories(B: int, m: int, p: int, dtype: torch.dtype, device, rule: str) -> BatchedHistory:
    if rule not in SIGMA_RULES:
        raise InputError(f"sigma must be one of {SIGMA_RULES}, got {rule!r}")
    z = torch.zeros(B, m, p, dtype=dtype, device=device)
    return _prepare(z, z.clone(), torch.zeros(B, dtype=torch.int64, device=device), rule)


def push_many(h: BatchedHistory, s: Tensor, y: Tensor, mask: Tensor, rule: str) -> BatchedHistory:
    """Append (s_b, y_b) to the histories where ``mask`` is set (oldest dropped when full)."""
    if not bool(mask.any()):
        return h
    S, Y = h.S.clone(), h.Y.clone()
    idx = torch.nonzero(mask).reshape(-1)
    S[idx] = torch.cat([h.S[idx, 1:], s[idx, None]], dim=1)
    Y[idx] = torch.cat([h.Y[idx, 1:], y[idx, None]], dim=1)
    count = torch.where(mask, (h.count + 1).clamp(max=S.shape[1]), h.count)
    return _prepare(S, Y, count, rule)


def hvp_many(h: BatchedHistory, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B·v_b for every b, ‖B·v_b‖/‖v_b‖, usable mask): the products of :func:`lbfgs.hvp`, batched."""
    Vd = V.double()
    q = torch.einsum("bkp,bp->bk", h.Wc, Vd)
    z = torch.linalg.lu_solve(h.LU, h.piv, q[..., None])[..., 0]
    Bv = h.sigma[:, None] * Vd - torch.einsum("bkp,bk->bp", h.Wc, z)
    nb, nv = Bv.norm(dim=1), Vd.norm(dim=1).clamp_min(1e-300)
    usable = h.ok & torch.isfinite(nb) & (nb <= h.bound * (1 + 1e-6) * nv)
    return Bv.to(V.dtype), nb / nv, usable


class BatchedState(NamedTuple):
    """The state of B replays before step ``step`` (see :class:`~.replay.ReplayState`)."""

    W: Tensor                 # (B, p)
    history: BatchedHistory
    step: int
    synced: Tensor            # (B,) bool
    curvature: Tensor         # (B,) float64
    explicit_steps: Tensor    # (B,) int64
    approx_steps: Tensor
    fallbacks: Tensor
    skipped_pairs: Tensor
    gap: Tensor               # (B,) int64, adaptive schedule
    next_explicit: Tensor     # (B,) int64
    pred_max: Tensor          # (B,) float64, L-BFGS prediction error at explicit steps
    pred_sum: Tensor
    pred_n: Tensor


class BatchedResult(NamedTuple):
    """Final parameters (B, p) and per-request counters (B,)."""

    params: Tensor
    steps: int
    explicit_steps: Tensor
    approx_steps: Tensor
    fallbacks: Tensor
    skipped_pairs: Tensor
    prediction_error_max: Tensor | None = None
    prediction_error_mean: Tensor | None = None

    def diagnostics(self, b: int) -> dict:
        out = {"steps": self.steps, "explicit_steps": int(self.explicit_steps[b]),
               "approx_steps": int(self.approx_steps[b]), "fallbacks": int(self.fallbacks[b]),
               "skipped_pairs": int(self.skipped_pairs[b])}
        if self.prediction_error_max is not None:
            out["prediction_error_max"] = round(float(self.prediction_error_max[b]), 6)
            out["prediction_error_mean"] = round(float(self.prediction_error_mean[b]), 6)
        return out


def _group(keys: Tensor, values: Tensor) -> dict[int, Tensor]:
    if len(values) == 0:
        return {}
    order = torch.argsort(keys, stable=True)
    uniq, counts = torch.unique_consecutive(keys[order], return_counts=True)
    return dict(zip(uniq.tolist(), torch.split(values[order], counts.tolist())))


class LocalRows:
    """The training rows a batched replay reads, held in this process (the default provider).

    A provider answers two questions: the features of some rows (the changed rows of the
    requests), and Σ ∇ℓ_i(w_b) over a step's cached batch for B parameter vectors — the explicit
    step's one pass over the data. The Ray backend's data-parallel mode answers them from data
    shards on other actors instead (:class:`deltagrad_ray.distributed.datashard.RemoteRows`).

    Args:
      model, data: the model and the rows.
      n_base: rows placed by the batch plan's permutation (the others were added later).
      gemm_dtype: precision of the explicit-step GEMMs (linear models; see BatchedReplay).
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

    def features(self, rows: Tensor) -> Tensor:
        return self.data.X[rows]

    def grad_many(self, W: Tensor, base: Tensor | None, weights: Tensor | None, extra: Tensor,
                  w_t: Tensor) -> Tensor:
        """Σ over ``base`` rows (None: all base rows, weighted) and ``extra`` rows of ∇ℓ_i(w_b), (B, p)."""
        if base is None:
            X, y = self.data.X[: self.n_base], self.data.y[: self.n_base]
            X_low = self.X_low[: self.n_base] if self.low is not None else None
        else:
            X, y = self.gather(base), self.data.y[base]
            X_low = self.gather_low(base) if self.low is not None else None
        ref = None
        if self.low is not None:
            ref = ManyRef(w_t, self.model.grad_sum(w_t, X, y, weights), X_low)
        out = [self.model.grad_sum_many(W[i:i + self.chunk], X, y, weights, ref)
               for i in range(0, W.shape[0], self.chunk)]
        G = torch.cat(out)
        if len(extra):
            G = G + self.model.grad_sum_many(W, self.data.X[extra], self.data.y[extra])
        return G


class BatchedReplay:
    """B change sets over one trajectory.

    Args:
      model, traj, data, config: as for :class:`~.replay.Replay`.
      changes: B change sets (e.g. from :mod:`deltagrad_ray.core.requests`).
      gemm_dtype: precision of the explicit-step GEMMs (linear models only); default: the
        data's. A lower one runs them in difference form around the cached point.
      gemm_bytes: memory budget of one explicit-step computation; requests are processed in
        chunks that fit (an MLP's activations for B requests over all rows can be large).
      rows: where the training rows' features are read (default :class:`LocalRows` over ``data``;
        ``data.X`` may then be zero-width: only ids and labels are used here).
    """

    def __init__(self, model: FunctionalModel, traj: Trajectory, data: Dataset, changes: Sequence[ChangeSet],
                 config: DeltaGradConfig = DeltaGradConfig(), *, gemm_dtype: torch.dtype | None = None,
                 gemm_bytes: int = 1 << 30, rows=None) -> None:
        if len(data) != traj.n_rows:
            raise InputError(f"the trajectory was trained on {traj.n_rows} rows, the data has {len(data)}")
        if not changes:
            raise InputError("no change sets given")
        self.model, self.traj, self.data, self.config = model, traj, data, config
        self.B, self.l2, dev = len(changes), traj.l2, data.X.device
        self.index = BatchIndex(traj.plan, data, traj.removed)  # the cached batches, shared
        self.explicit = config.explicit_steps(traj.steps).tolist()
        self.adaptive = config.schedule == "adaptive"
        self.rows = rows if rows is not None else LocalRows(
            model, data, traj.plan.n_base, gemm_dtype=gemm_dtype, gemm_bytes=gemm_bytes,
            batch_rows=traj.plan.batch_size)

        # every request's changed rows as one table of entries: (row features, label, ±1, owner)
        Xs, ys, signs, owners, base_rows, extra_ids, kinds = [], [], [], [], [], [], []
        nb = traj.plan.n_base
        for b, ch in enumerate(changes):
            d = ch.delete.to(dev)
            Xs.append(self.rows.features(d))
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
                extra_ids.append(a.ids)
                kinds.append(torch.ones(len(a), dtype=torch.bool, device=dev))
        self.ent_X, self.ent_y = torch.cat(Xs), torch.cat(ys)
        self.ent_sign, self.ent_owner = torch.cat(signs), torch.cat(owners)
        self.ent_base, self.ent_ids, self.ent_hashed = torch.cat(base_rows), torch.cat(extra_ids), torch.cat(kinds)
        self._epoch = -1
        if traj.plan.full_batch:
            self._gd = self._padded(torch.arange(len(self.ent_owner), device=dev))

    # -- which requests' rows are in step t ----------------------------------------------------
    def _load_epoch(self, epoch: int) -> None:
        plan = self.traj.plan
        k = torch.empty(len(self.ent_owner), dtype=torch.int64, device=self.data.X.device)
        base = ~self.ent_hashed
        if bool(base.any()):
            k[base] = plan.batch_of_base_rows(self.ent_base[base], epoch).to(k.device)
        if bool(self.ent_hashed.any()):
            k[self.ent_hashed] = plan.batch_of_added_ids(self.ent_ids[self.ent_hashed], epoch).to(k.device)
        self._by_k = _group(k, torch.arange(len(k), device=k.device))
        self._epoch = epoch

    def _padded(self, entries: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(X (B, r, d), y (B, r), weights (B, r), deleted (B,), added (B,)) for some entries."""
        B, dev = self.B, self.data.X.device
        entries = entries[torch.argsort(self.ent_owner[entries], stable=True)]
        owner = self.ent_owner[entries]
        counts = torch.bincount(owner, minlength=B)
        r = int(counts.max()) if len(entries) else 0
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(len(entries), device=dev) - starts[owner]
        idx = torch.full((B, r), -1, dtype=torch.int64, device=dev)
        idx[owner, pos] = entries
        safe = idx.clamp(min=0)
        w = torch.where(idx >= 0, self.ent_sign[safe], torch.zeros((), dtype=self.ent_sign.dtype, device=dev))
        sign = self.ent_sign[entries]
        deleted = torch.bincount(owner[sign < 0], minlength=B)
        added = torch.bincount(owner[sign > 0], minlength=B)
        return self.ent_X[safe], self.ent_y[safe], w, deleted, added

    def _entries(self, t: int):
        if self.traj.plan.full_batch:
            return self._gd
        epoch, k = self.traj.plan.locate(t)
        if epoch != self._epoch:
            self._load_epoch(epoch)
        return self._padded(self._by_k.get(k, torch.zeros(0, dtype=torch.int64, device=self.data.X.device)))

    # -- state ------------------------------------------------------------------------------------
    def start(self) -> BatchedState:
        t, B, dev = self.traj, self.B, self.traj.initial.device
        hist = empty_histories(B, self.config.history, t.p, t.dtype, dev, self.config.sigma)
        zeros = torch.zeros(B, dtype=torch.int64, device=dev)
        fz = torch.zeros(B, dtype=torch.float64, device=dev)
        return BatchedState(t.initial.expand(B, t.p).clone(), hist, 0, torch.ones(B, dtype=torch.bool, device=dev),
                            fz.clone(), zeros, zeros.clone(), zeros.clone(), zeros.clone(),
                            torch.full((B,), self.config.period, dtype=torch.int64, device=dev),
                            torch.full((B,), self.config.burn_in, dtype=torch.int64, device=dev),
                            fz.clone(), fz.clone(), zeros.clone())

    def _explicit_grads(self, W: Tensor, sb, w_t: Tensor) -> Tensor:
        """Σ ∇ℓ_i(w_b) over the cached batch for each row of W: one pass over the rows."""
        base, weights = self.index.base(sb)
        return self.rows.grad_many(W, base, weights, sb.extra, w_t)

    def _step(self, st: BatchedState, t: int, w_t: Tensor, g_t: Tensor, lr: float) -> BatchedState:
        sb = self.index.at(t)
        cfg, l2, size = self.config, self.l2, sb.size
        Xp, yp, wp, n_del, n_add = self._entries(t)
        changed = (n_del + n_add) > 0
        new_size = size - n_del + n_add
        W = st.W
        V = W - w_t
        active = ~st.synced
        hist, curv = st.history, st.curvature
        explicit_steps, approx_steps = st.explicit_steps.clone(), st.approx_steps.clone()
        fallbacks, skipped = st.fallbacks.clone(), st.skipped_pairs.clone()

        full = g_t.expand_as(W).clone()          # ∇F_{B_t}(w_b): exact for synced requests (v = 0)
        scheduled = torch.full_like(active, bool(self.explicit[t]))
        if self.adaptive:
            scheduled = scheduled | (st.next_explicit <= t)
        need = active & scheduled
        track = dict(gap=st.gap, next_explicit=st.next_explicit, pred_max=st.pred_max, pred_sum=st.pred_sum,
                     pred_n=st.pred_n)
        if bool((active & ~scheduled).any()):
            Bv, ratio, usable = hvp_many(hist, V)
            limit = cfg.curvature_guard * curv
            if cfg.max_curvature is not None:
                limit = limit.clamp(max=cfg.max_curvature)
            Bd, Vd = Bv.double(), V.double()
            stable = lr * (Bd * Bd).sum(1) <= 2 * (Vd * Bd).sum(1) * (1 + 1e-12)  # non-expansive (see replay)
            take = active & ~scheduled & usable & (ratio <= limit) & stable
            full[take] = g_t + Bv[take]
            approx_steps += take.long()
            refuse = active & ~scheduled & ~take
            fallbacks += refuse.long()
            need = need | refuse
        G = size * (full - l2 * W)
        if bool(need.any()):
            G, full, hist, curv, skipped = self._explicit(need, W, V, sb, w_t, g_t, G, full, hist, curv, skipped,
                                                          t, track)
            explicit_steps += need.long()
        corr = self.model.grad_sum_each(W, Xp, yp, wp) if Xp.shape[1] else None
        num = G if corr is None else G + corr
        safe = new_size.clamp(min=1).to(W.dtype)[:, None]
        g = torch.where((new_size > 0)[:, None], num / safe, torch.zeros_like(num)) + l2 * W
        keep = st.synced & ~changed                  # cache reused bit for bit
        g[keep] = g_t
        W_next = W - lr * g
        bad = ~torch.isfinite(W_next).all(dim=1) & active & ~need
        if bool(bad.any()):  # an approximation produced inf/NaN: redo those steps explicitly
            approx_steps -= bad.long()
            fallbacks += bad.long()
            G, full, hist, curv, skipped = self._explicit(bad, W, V, sb, w_t, g_t, G, full, hist, curv, skipped,
                                                          t, track)
            explicit_steps += bad.long()
            num = G if corr is None else G + corr
            g = torch.where((new_size > 0)[:, None], num / safe, torch.zeros_like(num)) + l2 * W
            g[keep] = g_t
            W_next = torch.where(bad[:, None], W - lr * g, W_next)
        return BatchedState(W_next, hist, t + 1, st.synced & ~changed, curv, explicit_steps, approx_steps,
                            fallbacks, skipped, **track)

    def _explicit(self, mask, W, V, sb, w_t, g_t, G, full, hist, curv, skipped, t, track):
        """Explicit steps (Alg. 1, lines 5-7) for the requests in ``mask``, in one computation."""
        idx = torch.nonzero(mask).reshape(-1)
        Gx = self._explicit_grads(W[idx], sb, w_t)
        fx = Gx / sb.size + self.l2 * W[idx] if sb.size else self.l2 * W[idx]
        G, full = G.clone(), full.clone()
        G[idx], full[idx] = Gx, fx
        s = torch.zeros_like(W)
        y = torch.zeros_like(W)
        s[idx], y[idx] = V[idx], fx - g_t
        sd, yd = s.double(), y.double()
        # the L-BFGS prediction error at this explicit step (see ReplayResult), and the adaptive gap
        pred, _, usable = hvp_many(hist, s)
        measured = mask & usable
        e = (pred.double() - yd).norm(dim=1) / yd.norm(dim=1).clamp_min(1e-300)
        e = torch.where(measured, e, torch.zeros_like(e))
        track["pred_max"] = torch.where(measured, torch.maximum(track["pred_max"], e), track["pred_max"])
        track["pred_sum"] = track["pred_sum"] + e
        track["pred_n"] = track["pred_n"] + measured.long()
        if self.adaptive and t >= self.config.burn_in:
            tol, gap = self.config.adaptive_tol, track["gap"]
            new_gap = torch.where(e > tol, (gap // 2).clamp(min=1),
                                  torch.where(e < tol / 4, (gap * 2).clamp(max=self.config.period), gap))
            track["gap"] = torch.where(measured, new_gap, gap)
            track["next_explicit"] = torch.where(mask, t + track["gap"], track["next_explicit"])
        sy, ns, ny = (sd * yd).sum(1), sd.norm(dim=1), yd.norm(dim=1)
        ok = mask & (ns > 0) & (ny > 0) & torch.isfinite(sy) & (sy > self.config.curvature_eps * ns * ny)
        skipped = skipped + (mask & ~ok).long()
        hist = push_many(hist, s, y, ok, self.config.sigma)
        curv = torch.where(ok, torch.maximum(curv, ny / ns.clamp_min(1e-300)), curv)
        return G, full, hist, curv, skipped

    def run_segment(self, st: BatchedState, seg: Segment) -> BatchedState:
        if seg.start != st.step:
            raise ValueError(f"segment starts at step {seg.start}, the replay is at step {st.step}")
        lrs = seg.lrs.tolist()
        for i in range(seg.stop - seg.start):
            st = self._step(st, seg.start + i, seg.params[i], seg.grads[i], lrs[i])
        return st

    def result(self, st: BatchedState) -> BatchedResult:
        return BatchedResult(st.W, self.traj.steps, st.explicit_steps, st.approx_steps, st.fallbacks,
                             st.skipped_pairs, st.pred_max, st.pred_sum / st.pred_n.clamp(min=1))


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
      gemm_dtype: see :class:`BatchedReplay`.
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
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    bounds = list(range(0, len(changes), batch_size))
    per_pass = batches_per_pass or len(bounds)
    results: list[BatchedResult] = []
    for p0 in range(0, len(bounds), per_pass):
        runs = [BatchedReplay(model, traj, data, changes[i:i + batch_size], config, gemm_dtype=gemm_dtype)
                for i in bounds[p0:p0 + per_pass]]
        states = [r.start() for r in runs]
        for seg in traj.segments():
            states = [r.run_segment(s, seg) for r, s in zip(runs, states)]
        results += [r.result(s) for r, s in zip(runs, states)]
        if progress is not None:
            progress(sum(r.B for r in runs))
    return BatchedResult(torch.cat([r.params for r in results]), traj.steps,
                         *(torch.cat([getattr(r, f) for r in results])
                           for f in ("explicit_steps", "approx_steps", "fallbacks", "skipped_pairs",
                                     "prediction_error_max", "prediction_error_mean")))
