"""Sampled exact verification of a fan-out, with a distribution-free guarantee.

K of the N requests are drawn uniformly at random (without replacement) and retrained exactly
(:func:`~deltagrad_ray.core.retrain_batched`); each drawn request's error is
``‖θ_DeltaGrad − θ_exact‖ / ‖θ_exact − θ_full‖`` (the ratio every test of this project checks).

The guarantee (order statistics; e.g. Wilks 1941, or any text on distribution-free tolerance
limits): let e_(1) ≤ … ≤ e_(K) be the drawn errors and F the distribution of the error over all N
requests. For the m-th smallest, P(F(e_(m)) < q) = P(Binomial(K, q) ≥ m) when the draws are
independent; drawing without replacement only makes the sample more representative, so the same
bound holds conservatively. Hence, with probability at least

    confidence = P(Binomial(K, q) ≤ m − 1)

over the draw, at least a fraction q of ALL requests have error ≤ e_(m). :func:`verify_sample`
reports the smallest m reaching the requested confidence (the tightest bound); with m = K (the
maximum), confidence = 1 − q^K: K = 59 gives 95% of requests at 95% confidence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..core.errors import InputError


@dataclass(frozen=True)
class Verification:
    """What sampled exact verification found.

    Fields:
      sampled:      K, the requests retrained exactly
      population:   N, the requests of the run
      median_error, max_error: over the drawn requests
      quantile:     q, the fraction of all requests the bound covers
      confidence:   the probability (over the draw) that it does
      bound:        e_(m), the error bound (None when no order statistic reaches the confidence)
      order:        m
      indices:      the drawn requests (positions in the run)
      errors:       their errors, in the order of ``indices``
    """

    sampled: int
    population: int
    median_error: float
    max_error: float
    quantile: float
    confidence: float
    bound: float | None
    order: int | None
    indices: tuple[int, ...]
    errors: tuple[float, ...]

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("indices")
        out.pop("errors")
        return out

    def statement(self) -> str:
        if self.bound is None:
            return (f"{self.sampled} request(s) retrained exactly: too few for {self.quantile:.0%} of requests at "
                    f"{self.confidence:.0%} confidence (max error {self.max_error:.3g})")
        return (f"with probability >= {self.confidence:.1%}, at least {self.quantile:.0%} of all {self.population} "
                f"requests have error <= {self.bound:.3g} (relative to each request's effect; {self.sampled} "
                f"retrained exactly, max {self.max_error:.3g})")


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) ≤ k)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1)))


def order_statistic(k: int, quantile: float, confidence: float) -> tuple[int | None, float]:
    """(m, achieved confidence): the smallest order m of K draws whose value bounds a fraction
    ``quantile`` of the population with probability ≥ ``confidence``; (None, best achievable) if none."""
    for m in range(1, k + 1):
        achieved = binom_cdf(m - 1, k, quantile)
        if achieved >= confidence:
            return m, achieved
    return None, binom_cdf(k - 1, k, quantile)


def draw(n: int, k: int, seed: int = 0) -> Tensor:
    """K distinct positions out of N, uniformly (sorted)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[: min(k, n)].sort().values


def check_settings(k: int, quantile: float, confidence: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"verify must be an integer >= 1 (requests to retrain exactly), got {k!r}")
    for name, v in (("quantile", quantile), ("confidence", confidence)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v < 1:
            raise InputError(f"verification {name} must be a number in (0, 1), got {v!r}")


def verification(replayed: Tensor, exact: Tensor, full: Tensor, indices: Tensor, population: int, *,
                 quantile: float = 0.95, confidence: float = 0.95) -> Verification:
    """The :class:`Verification` of drawn requests from their replayed and exact models.

    Args:
      replayed: (K, p) the drawn requests' DeltaGrad models.
      exact: (K, p) their exact retrainings.
      full: (p,) the model before any change (each request's effect is measured from it).
      indices: (K,) their positions in the run.
      population: N.
    """
    check_settings(len(indices), quantile, confidence)
    moved = (exact - full).double().norm(dim=1)
    dist = (replayed - exact).double().norm(dim=1)
    err = torch.where(moved > 0, dist / moved.clamp_min(1e-300),
                      torch.where(dist == 0, torch.zeros_like(dist), torch.full_like(dist, math.inf)))
    m, achieved = order_statistic(len(err), quantile, confidence)
    srt = err.sort().values
    return Verification(len(err), int(population), float(err.median()), float(err.max()), float(quantile),
                        float(achieved), None if m is None else float(srt[m - 1]), m,
                        tuple(int(i) for i in indices), tuple(float(e) for e in err))


__all__ = ["Verification", "binom_cdf", "check_settings", "draw", "order_statistic", "verification"]
