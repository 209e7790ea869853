"""An error estimate for every replay, from what the replay already measures (docs/certificate.md).

Let w^I_t be the replayed path, w^U_t exact retraining on the changed data (same θ_0, η_t and
batches) and e_t = w^I_t − w^U_t. Each replayed step uses ĝ_t = ∇F'_t(w^I_t) + δ_t, where F'_t is
the changed batch's objective and δ_t the step's gradient error, so

    e_{t+1} = [e_t − η_t(∇F'_t(w^I_t) − ∇F'_t(w^U_t))] − η_t·δ_t.

For an objective that is λ-strongly convex and L-smooth the bracket is a contraction with factor
ρ_t = max(|1 − η_t·λ|, |1 − η_t·L|) (Nesterov 2004, Thm. 2.1.15), hence

    ‖e_T‖ ≤ Σ_t (Π_{s>t} ρ_s)·η_t·‖δ_t‖.                                            (1)

δ_t is 0 at explicit steps (the gradient is exact; only round-off remains). On an approximate
step the changed rows are corrected exactly, so δ_t = (|B_t|/|B'_t|)·(g_t + B_t·v_t − ∇F_{B_t}(w^I_t)):
the curvature model's error on the step's v_t = w^I_t − w_t, which is not computed. But every
explicit step measures exactly that error for the model the approximate steps before it used
(the model only changes at explicit steps): r = ‖B·s − y‖ / ‖B·s‖ with s = v and y the exact
gradient difference. The estimate takes, for each approximate step, ‖δ_t‖ ≈ c·r·(|B_t|/|B'_t|)·‖B_t·v_t‖
with r the larger of the measurements that close its interval and the one before (the tail after
the last explicit step takes the larger of the last two), and c = :func:`safety`. ρ_t uses λ (the
l2 term: a lower bound on the curvature of any convex loss) and L̂, the largest secant curvature
the replay measured. Since the measurement that prices an interval comes at its end, the sum is
kept in two parts: ``err_bound``, the priced steps, and ``err_open``, Σ (Π ρ)·η·(|B|/|B'|)·‖B·v‖ of
the interval still open; both contract by ρ_t at every step. O(1) per request and step beyond the
norm ‖B·v‖, which the stability guard already computes.

Denominator: ‖θ_exact − θ_parent‖ ≥ ‖θ_DG − θ_parent‖ − ‖e_T‖, so the estimate of the error ratio
‖θ_DG − θ_exact‖ / ‖θ_exact − θ_parent‖ is A / (‖v_T‖ − A), infinite when A ≥ ‖v_T‖.

What it rests on: (1) needs a convex loss (the built-in logreg and linear models) and η_t·L ≤ 2;
the interval's error is estimated, not bounded, from its measurement, which is why c was chosen by
calibration (``python -m benchmarks.calibration``). For a non-convex model (an MLP) the bracket can
expand, (1) does not hold, and ``reliable`` is False: certify such replays by sampled exact
verification (:func:`~.train.retrain`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .config import CONVEX_KINDS
from .errors import InputError

# c, the factor on each interval's measured prediction error, by optimizer. Measured per approximate step
# against its true gradient error (docs/certificate.md): with gradient descent the interval's closing
# measurement times ‖B·v‖ was above the true ‖δ_t‖ at every step (true/estimate ≤ 0.96, median 0.45);
# with SGD a step's batch differs from the measured one and the estimate fell short by up to 1.94×.
SAFETY_GD = 1.0
SAFETY_SGD = 2.0
# Round-off: the replay and exact retraining sum in different orders, so even an all-explicit replay
# differs from retraining, by 0.1–0.8 units of u·‖θ‖ measured (float32 and float64). Each step adds
# ROUNDOFF·u·(‖w_t‖ + η_t‖g_t‖), in quadrature (independent roundings; Higham & Mary 2019).
ROUNDOFF = 2.0

BASIS_EXACT = "exact"            # no approximate step: an empty change, or exact retraining
BASIS_CONVEX = "convex"          # (1) holds: λ-strongly convex loss (logreg, linear), η·L̂ ≤ 2
BASIS_UNSTABLE = "step-size"     # convex, but η·L̂ > 2 was measured: no contraction guaranteed
BASIS_NONCONVEX = "non-convex"   # an MLP or another module: (1) does not hold
BASES = (BASIS_EXACT, BASIS_CONVEX, BASIS_UNSTABLE, BASIS_NONCONVEX)   # from the firmest to the weakest
RELIABLE = (BASIS_EXACT, BASIS_CONVEX)


def worst_basis(bases: Sequence[str]) -> str:
    """The weakest of some bases (a chain is as reliable as its least reliable version)."""
    return max(bases, key=BASES.index, default=BASIS_EXACT)


def safety(full_batch: bool) -> float:
    """c for a trajectory trained by gradient descent (``full_batch``) or by SGD."""
    return SAFETY_GD if full_batch else SAFETY_SGD


def contraction(lr: float, l2: float, curvature):
    """ρ_t = max(|1 − η·λ|, |1 − η·L̂|) per request (B,), float64 (or a number, for a number L̂): the
    factor by which a step of gradient descent on a λ-strongly convex, L̂-smooth objective contracts a
    difference of iterates."""
    rate, floor = abs(1.0 - lr * curvature), abs(1.0 - lr * l2)
    return rate.clamp_(min=floor) if isinstance(rate, Tensor) else max(rate, floor)


def advance(err_open, err_bound, roundoff_sq, rho, opened, unit_sq):
    """One step of the error estimate (eq. 1): both parts contract by ρ, the open part takes this
    step's η·(|B|/|B'|)·‖B·v‖ (``opened``, 0 for an exact step) and the round-off part this step's
    unit², in quadrature (``unit_sq``, 0 for a request on the cached path). Tensors or numbers."""
    return rho * err_open + opened, rho * err_bound, rho * rho * roundoff_sq + unit_sq


class Certificate(NamedTuple):
    """The error estimate of B replays.

    Fields:
      absolute: (B,) float64 estimate of ‖θ_DG − θ_exact‖
      ratio:    (B,) float64 estimate of ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_parent‖ (inf when the
                replay cannot be told apart from its parent by more than the estimate)
      reliable: (B,) bool, the estimate rests on (1) (see the module docstring)
      basis:    (B,) why, one of :data:`BASIS_CONVEX`, :data:`BASIS_UNSTABLE`, :data:`BASIS_NONCONVEX`
    """

    absolute: Tensor
    ratio: Tensor
    reliable: Tensor
    basis: tuple[str, ...]


def ratio_of(absolute: Tensor, moved: Tensor) -> Tensor:
    """A / (‖v_T‖ − A): the ratio estimate from the absolute one and ‖θ_DG − θ_parent‖ (inf if A ≥ ‖v_T‖)."""
    gap = moved - absolute
    return torch.where(gap > 0, absolute / gap.clamp_min(1e-300), torch.full_like(absolute, math.inf))


def certify(err_bound: Tensor, err_open: Tensor, rate_last: Tensor, rate_prev: Tensor, roundoff: Tensor,
            moved: Tensor, *, safety: float, kind: str | None, max_lr: float, curvature: Tensor) -> Certificate:
    """The estimate at the end of a replay from its accumulators (all (B,) float64).

    Args:
      err_bound, err_open: the priced and the open part of (1) (the tail after the last explicit step).
      rate_last, rate_prev: the last two measured prediction errors ‖B·s − y‖/‖B·s‖.
      roundoff: the round-off term.
      moved: ‖θ_DG − θ_parent‖.
      safety: c (:func:`safety`).
      kind: the built-in model's kind (None for another module).
      max_lr: the largest η_t of the trajectory.
      curvature: L̂ per request.
    """
    absolute = err_bound + safety * torch.maximum(rate_last, rate_prev) * err_open + roundoff
    ratio = ratio_of(absolute, moved)
    if kind not in CONVEX_KINDS:
        return Certificate(absolute, ratio, torch.zeros_like(moved, dtype=torch.bool),
                           (BASIS_NONCONVEX,) * len(moved))
    stable = max_lr * curvature <= 2.0
    return Certificate(absolute, ratio, stable, tuple(BASIS_CONVEX if s else BASIS_UNSTABLE for s in stable.tolist()))


class Drift(NamedTuple):
    """A chain's error estimate: ``absolute`` ≈ ‖θ_k − θ_exact,k‖, ``ratio`` ≈ that over ‖θ_exact,k − θ_base‖."""

    absolute: float
    ratio: float


def drift_estimate(absolute: Sequence[float], moved: float, *, growth: float = 1.0) -> Drift:
    """The error of version k of a chain of replays, each replaying the previous one's replayed path.

    Version j replays version j−1's derived cache, whose gradients ĝ carry version j−1's gradient
    errors (0 at its explicit steps). Version j's step t therefore uses the gradient error of every
    version before it at step t plus its own model error, each scaled by the ratio of the batch
    sizes (|B'_{j,t}| / |B'_{k,t}| ≥ 1, close to 1 when the erased rows are few). Summing (1) over
    the versions, with the same λ, η_t and batches in all of them:

        ‖θ_k − θ_exact,k‖ ≲ growth · Σ_j A_j,

    where A_j is version j's own absolute estimate (``error_absolute``) and ``growth`` bounds the
    batch-size ratio. It rests on what each A_j rests on (a convex loss, calibrated intervals) and
    on every version being a replay of the previous one's recorded path (``record=True``).

    Args:
      absolute: A_1 … A_k, the absolute estimates of the versions since the last exact one.
      moved: ‖θ_k − θ_base‖, the distance of version k from the last exact version.
      growth: the largest |B'_{j,t}| / |B'_{k,t}| (gradient descent: rows of the first version over rows
        of the last).

    Returns:
      :class:`Drift` (absolute, ratio); ratio is inf when the absolute estimate reaches ``moved``.

    Example:
      >>> drift_estimate([1e-6, 2e-6], moved=1e-3)
      Drift(absolute=3e-06, ratio=0.0030090270812437314)
    """
    values = [float(a) for a in absolute]
    if not values:
        raise InputError("no versions given: drift_estimate needs the absolute estimate of at least one version")
    bad = [a for a in values if not a >= 0]
    if bad:
        raise InputError(f"absolute error estimates must be numbers >= 0, got {bad[0]!r}")
    if not (growth >= 1 and math.isfinite(growth)):
        raise InputError(f"growth must be a finite number >= 1, got {growth!r}")
    if not moved >= 0:
        raise InputError(f"moved must be a number >= 0, got {moved!r}")
    total = growth * math.fsum(values)
    return Drift(total, total / (moved - total) if moved > total else math.inf)
