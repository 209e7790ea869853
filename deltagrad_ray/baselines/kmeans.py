"""Deletion-efficient k-means: Q-k-means (Ginart, Guan, Valiant & Zou 2019, "Making AI Forget You", Alg. 2).

Q-k-means is Lloyd's algorithm with quantised centroids. Iteration τ = 1..T assigns every row
to the nearest centroid of ĉ^{τ−1}, forms per-cluster sums S and counts N, and the centroid
c = S/N, pulled towards ĉ^{τ−1} when the cluster is small (γ-balance: with m = γn/k,
c = (S + (m − N)·ĉ^{τ−1})/m when N < m), then rounds it to a lattice of spacing ε shifted by a
random phase θ_τ ∈ [0, 1)^d:  ĉ^τ = ε·(round(c/ε + θ_τ − ½) − θ_τ + ½). The seeds ĉ^0 come from
k-means++ (Arthur & Vassilvitskii 2007) and are not quantised.

Everything a later change needs is kept: the seeds, the phases, and for every iteration the
assignments, sums and counts. The run is then a function of the rows only through those sums,
so a change is certified by arithmetic on its own rows (Ginart et al., Alg. 3):

1. **Seeds.** k-means++ is run as an exponential race keyed by row id: in round j every row
   draws E_{j,i} = −log U(seed, j, id) and the row minimising E_{j,i}/D²(x_i) wins (which samples
   rows ∝ D², the k-means++ rule). A row's key does not depend on other rows, so deleting a row
   that never won leaves every round's winner unchanged, and an added row changes the seeds only
   if its own key beats a round's winning key. With this, "same seed" means "same seeds".
2. **Iterations.** For τ = 1..T the changed rows leave (or join) the cluster they were (would
   be) assigned to under ĉ^{τ−1}; the k centroids are recomputed from the updated S, N (and the
   new n, which moves m) and quantised with θ_τ. If every quantised centroid equals the stored
   ĉ^τ, the assignments of all other rows at τ + 1 are unchanged. The stored assignments are
   valid up to the first iteration that fails, so all T iterations are checked in one batched
   computation (O(T·(r + a)·d + T·k·d) work, a few dozen array operations).
3. The first iteration where a quantised centroid changes (or the seeds change) is rerun from
   there with all rows; if none changes, nothing is rerun and only the statistics are updated.

The result is identical (bit for bit) to running Q-k-means from scratch on the changed rows with
the same seed (tested). A centroid within 1e-9 lattice units of a rounding boundary counts as
changed, so the round-off of updating sums instead of recomputing them can never flip a
rounding. ``eps = 0`` is plain Lloyd's algorithm: every change that moves a centroid reruns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.data import ChangeSet, Dataset
from ..core.errors import InputError
from .base import Outcome, Rows, id_uniform, request

BOUNDARY_MARGIN = 1e-9   # lattice units: closer than this to a rounding boundary counts as "changed"
CHUNK = 8192             # rows per block when computing distances
_RACE_SALT = 0xC0FFEE


class QKMeansState(NamedTuple):
    """A Q-k-means run and the statistics that certify changes.

    Fields:
      rows:      current rows (deleted ones flagged)
      seeds:     (k,) int64 positions in ``rows.data`` of the k-means++ seeds
      seed_keys: (k,) float64 winning race key of each k-means++ round
      phases:    (T, d) lattice phase of each iteration
      centroids: (T + 1, k, d) ĉ^0 (seeds) .. ĉ^T (quantised)
      assign:    (T, N) int64 cluster of each row at each iteration (stale for deleted rows)
      sums:      (T, k, d) per-cluster sums of the active rows
      counts:    (T, k) int64 per-cluster counts
    """

    rows: Rows
    seeds: Tensor
    seed_keys: Tensor
    phases: Tensor
    centroids: Tensor
    assign: Tensor
    sums: Tensor
    counts: Tensor

    @property
    def params(self) -> Tensor:
        """(k, d) the final quantised centroids."""
        return self.centroids[-1]


def nearest(X: Tensor, C: Tensor) -> Tensor:
    """Index of the nearest centroid of each row (ties: the smaller index), computed row by row."""
    out = []
    for lo in range(0, X.shape[0], CHUNK):
        diff = X[lo: lo + CHUNK, None, :] - C[None, :, :]
        out.append((diff * diff).sum(-1).argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=X.device)


def sq_dist(X: Tensor, c: Tensor) -> Tensor:
    """‖x_i − c‖² of each row, (n,)."""
    diff = X - c
    return (diff * diff).sum(-1)


@dataclass(frozen=True)
class QKMeans:
    """Quantised k-means with certified, mostly rerun-free deletions and additions.

    Args:
      k: clusters, >= 1.
      iters: Lloyd iterations T, >= 1.
      eps: lattice spacing ε > 0 (coarser: fewer reruns, a little more loss), or 0 for Lloyd's.
      gamma: balance parameter γ in [0, 1): clusters below γn/k rows are pulled to their last centroid.
      seed: seeds the k-means++ race and the phases.
    """

    k: int
    iters: int = 10
    eps: float = 0.5
    gamma: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"k-means needs k >= 1 clusters, got k={self.k!r}")
        if not isinstance(self.iters, int) or self.iters < 1:
            raise InputError(f"k-means needs iters >= 1, got {self.iters!r}")
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise InputError(f"quantisation eps must be a finite number >= 0, got {self.eps!r}")
        if not (0 <= self.gamma < 1):
            raise InputError(f"gamma must be in [0, 1), got {self.gamma!r}")

    @property
    def name(self) -> str:
        return f"q-k-means(eps={self.eps:g})"

    # -- the interface ---------------------------------------------------------------------------
    def fit(self, data: Dataset) -> QKMeansState:
        X = data.X
        if X.ndim != 2 or not X.is_floating_point() or not bool(torch.isfinite(X).all()):
            raise InputError("k-means data must be a 2-D array of finite floats")
        if len(data) < self.k:
            raise InputError(f"k-means needs at least k={self.k} rows, got {len(data)}")
        rows = Rows.of(data)
        T, N, d = self.iters, len(data), data.n_features
        g = torch.Generator().manual_seed(int(self.seed))
        phases = torch.rand(T, d, generator=g, dtype=torch.float64).to(dtype=X.dtype, device=X.device)
        seeds, keys = self._seeds(data.X, data.ids)
        centroids = torch.zeros(T + 1, self.k, d, dtype=X.dtype, device=X.device)
        centroids[0] = X[seeds]
        state = QKMeansState(rows, seeds, keys, phases, centroids,
                             torch.zeros(T, N, dtype=torch.int64, device=X.device),
                             torch.zeros(T, self.k, d, dtype=X.dtype, device=X.device),
                             torch.zeros(T, self.k, dtype=torch.int64, device=X.device))
        return self._iterate(state, 1)

    def change(self, state: QKMeansState, *, delete_ids: Tensor | None = None,
               add: Dataset | None = None) -> ChangeSet:
        return request(state.rows, delete_ids=delete_ids, add=add, ignore_labels=True)

    def apply(self, state: QKMeansState, change: ChangeSet) -> Outcome:
        """Certify the change iteration by iteration; rerun from the first iteration it alters."""
        rows = state.rows.after(change)
        if rows.n_active < self.k:
            raise InputError(f"k-means needs at least k={self.k} rows; the change leaves {rows.n_active}")
        old_n = len(state.rows.data)
        Xd = state.rows.data.X[change.delete]
        Xa = change.add.X if change.add is not None else Xd[:0]
        assign = state.assign
        if len(Xa):
            assign = torch.cat([assign, torch.zeros(self.iters, len(Xa), dtype=assign.dtype, device=assign.device)], 1)
        base = state._replace(rows=rows, assign=assign, sums=state.sums.clone(), counts=state.counts.clone())

        # 1. the k-means++ seeds
        seeds_hit = bool(torch.isin(change.delete, state.seeds).any())
        if not seeds_hit and len(Xa):
            seeds_hit = self._beats_seeds(state, Xa, change.add.ids)
        if seeds_hit:
            fresh = self.fit(rows.active())
            out = self._reindex(fresh, rows)
            return Outcome(out, out.params, {"rerun_from": 0, "certified_iterations": 0})

        # 2. the Lloyd iterations, all T checked at once from the stored statistics. The stored
        #    assignments of iteration τ are valid as long as ĉ^1..ĉ^{τ-1} are unchanged, which holds
        #    up to the first iteration that fails: everything from there on is rerun.
        T, k = self.iters, self.k
        sums, counts = base.sums, base.counts
        tk = torch.arange(T, device=sums.device)[:, None] * k          # row of (τ, cluster) in (T·k)
        if len(Xd):
            slot = (tk + state.assign[:, change.delete]).reshape(-1)    # (T·r,)
            sums.view(T * k, -1).index_add_(0, slot, Xd.repeat(T, 1), alpha=-1)
            counts.view(-1).index_add_(0, slot, torch.full_like(slot, -1))
        if len(Xa):
            a_add = torch.stack([nearest(Xa, state.centroids[tau]) for tau in range(T)])   # (T, a)
            assign[:, old_n:] = a_add
            slot = (tk + a_add).reshape(-1)
            sums.view(T * k, -1).index_add_(0, slot, Xa.repeat(T, 1))
            counts.view(-1).index_add_(0, slot, torch.ones_like(slot))
        c = self._centroids(sums, counts, state.centroids[:-1], rows.n_active)              # (T, k, d)
        same = self._same_lattice_point(c, state.phases[:, None, :], state.centroids[1:])  # (T,)
        if not bool(same.all()):
            tau = int(torch.nonzero(~same)[0]) + 1
            out = self._iterate(base, tau)
            return Outcome(out, out.params, {"rerun_from": tau, "certified_iterations": tau - 1})
        return Outcome(base, base.params, {"rerun_from": None, "certified_iterations": T})

    def exact(self, state: QKMeansState, change: ChangeSet) -> Outcome:
        """Q-k-means rerun from scratch on the rows after ``change``, with the same seed."""
        rows = state.rows.after(change)
        fresh = self.fit(rows.active())
        return Outcome(fresh, fresh.params, {})

    def evaluate(self, state: QKMeansState, X: Tensor, y: Tensor | None = None) -> dict[str, float]:
        """k-means loss: mean squared distance of each row of X to its nearest centroid."""
        C = state.params
        a = nearest(X, C)
        return {"loss": float(sq_dist(X, C[a]).mean())}

    # -- internals -----------------------------------------------------------------------------
    def _keys(self, ids: Tensor, round_: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return (-torch.log(id_uniform(ids, self.seed, _RACE_SALT + round_))).to(dtype=dtype, device=device)

    def _seeds(self, X: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """k-means++ by exponential races keyed by id: (positions of the seeds, winning keys)."""
        seeds, keys = [], []
        w = torch.ones(X.shape[0], dtype=X.dtype, device=X.device)
        for j in range(self.k):
            key = self._keys(ids, j, X.dtype, X.device) / w      # w = 0 gives +inf: never chosen again
            i = int(key.argmin())
            seeds.append(i)
            keys.append(float(key[i]))
            dist = sq_dist(X, X[i])
            w = dist if j == 0 else torch.minimum(w, dist)
        return (torch.tensor(seeds, dtype=torch.int64, device=X.device),
                torch.tensor(keys, dtype=torch.float64, device=X.device))

    def _beats_seeds(self, state: QKMeansState, Xa: Tensor, ids: Tensor) -> bool:
        """Would an added row win any k-means++ round (or tie within round-off)?"""
        w = torch.ones(len(Xa), dtype=Xa.dtype, device=Xa.device)
        seeds_X = state.centroids[0]
        for j in range(self.k):
            key = (self._keys(ids, j, Xa.dtype, Xa.device) / w).to(torch.float64)
            if bool((key <= state.seed_keys[j] * (1 + 1e-12)).any()):
                return True
            dist = sq_dist(Xa, seeds_X[j])
            w = dist if j == 0 else torch.minimum(w, dist)
        return False

    def _centroids(self, sums: Tensor, counts: Tensor, prev: Tensor, n: int) -> Tensor:
        """Means, pulled towards ``prev`` for clusters under m = γn/k rows (Ginart et al., Alg. 2).

        Shapes (..., k, d), (..., k), (..., k, d): one iteration or all T at once.
        """
        m = self.gamma * n / self.k
        N = counts.to(sums.dtype)[..., None]
        denom = torch.clamp(N, min=m)
        c = (sums + torch.clamp(m - N, min=0) * prev) / torch.where(denom > 0, denom, torch.ones_like(denom))
        return torch.where(denom > 0, c, prev)   # γ = 0 and an empty cluster: keep the last centroid

    def _quantise(self, c: Tensor, phase: Tensor) -> Tensor:
        if self.eps == 0:
            return c
        return self.eps * (torch.round(c / self.eps + phase - 0.5) - phase + 0.5)

    def _same_lattice_point(self, c: Tensor, phase: Tensor, stored: Tensor) -> Tensor:
        """Per leading index (iteration): does Q(c) equal ``stored``, safely away from a rounding boundary?"""
        dims = tuple(range(1, c.ndim))
        if self.eps == 0:
            return (c == stored).all(dim=dims) if dims else (c == stored)
        z = c / self.eps + phase - 0.5
        safe = ((z - torch.round(z)).abs() - 0.5).abs() >= BOUNDARY_MARGIN
        return ((self._quantise(c, phase) == stored) & safe).all(dim=dims)

    def _iterate(self, state: QKMeansState, start: int) -> QKMeansState:
        """Lloyd iterations start..T over the active rows, from ĉ^{start−1}; returns the new state."""
        idx = state.rows.active_index()
        X = state.rows.data.X[idx]
        n = len(idx)
        centroids, assign = state.centroids.clone(), state.assign.clone()
        sums, counts = state.sums.clone(), state.counts.clone()
        for tau in range(start, self.iters + 1):
            prev = centroids[tau - 1]
            a = nearest(X, prev)
            assign[tau - 1, idx] = a
            S = torch.zeros_like(prev).index_add_(0, a, X)
            N = torch.bincount(a, minlength=self.k)
            sums[tau - 1], counts[tau - 1] = S, N
            centroids[tau] = self._quantise(self._centroids(S, N, prev, n), state.phases[tau - 1])
        return state._replace(centroids=centroids, assign=assign, sums=sums, counts=counts)

    def _reindex(self, fresh: QKMeansState, rows: Rows) -> QKMeansState:
        """A fit on ``rows.active()`` expressed over all of ``rows`` (positions and assignments)."""
        idx = rows.active_index()
        assign = torch.zeros(self.iters, len(rows.data), dtype=fresh.assign.dtype, device=fresh.assign.device)
        assign[:, idx] = fresh.assign
        return fresh._replace(rows=rows, seeds=idx[fresh.seeds], assign=assign)
