"""Jackknife+ and CV+ prediction intervals and conformal classification sets.

Barber, Candès, Ramdas & Tibshirani (2021), "Predictive inference with the jackknife+",
Ann. Statist. 49(1). For training point i let μ̂_(i) be the model fitted without i
(jackknife+) or without i's fold (CV+), and R_i = |y_i − μ̂_(i)(x_i)|. For a test point x,

    Ĉ(x) = [ q̂⁻_α{ μ̂_(i)(x) − R_i },  q̂⁺_α{ μ̂_(i)(x) + R_i } ]

with q̂⁺_α the ⌈(1 − α)(n + 1)⌉-th smallest value and q̂⁻_α the ⌊α(n + 1)⌋-th smallest
(±∞ when out of range). Coverage ≥ 1 − 2α for any distribution; ≈ 1 − α in practice.

Classification in the same style (Romano, Sesia & Candès 2020, CV+ with non-conformity scores):
with score s(x, y; μ) = 1 − p̂_μ(y | x) and R_i = s(x_i, y_i; μ̂_(i)),

    Ĉ(x) = { y : #{i : s(x, y; μ̂_(i)) > R_i} < (1 − α)(n + 1) }.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import InputError


def check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise InputError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def _kth(values: Tensor, k: int, lower_inf: bool) -> Tensor:
    """k-th smallest (1-based) along dim 0; ±∞ when k is out of [1, n]."""
    n = values.shape[0]
    if k < 1:
        return torch.full(values.shape[1:], -math.inf if lower_inf else math.inf, dtype=values.dtype)
    if k > n:
        return torch.full(values.shape[1:], math.inf, dtype=values.dtype)
    return torch.kthvalue(values, k, dim=0).values


def jackknife_plus_intervals(loo_pred_train: Tensor, y_train: Tensor, loo_pred_test: Tensor,
                             alpha: float) -> tuple[Tensor, Tensor]:
    """Jackknife+ (or CV+) intervals for m test points.

    Args:
      loo_pred_train: (n,) μ̂_(i)(x_i), each training point predicted by the model without it
        (or without its fold, for CV+).
      y_train: (n,) targets.
      loo_pred_test: (n, m) μ̂_(i)(x) for every test point x, by the same model as row i.
      alpha: miscoverage level in (0, 1).

    Returns:
      (lower (m,), upper (m,)).
    """
    alpha = check_alpha(alpha)
    n = loo_pred_train.shape[0]
    if y_train.shape != (n,) or loo_pred_test.shape[0] != n:
        raise InputError(f"expected {n} training targets and {n} rows of test predictions, got "
                         f"{tuple(y_train.shape)} and {tuple(loo_pred_test.shape)}")
    R = (y_train - loo_pred_train).abs()[:, None]
    lower = _kth(loo_pred_test - R, math.floor(alpha * (n + 1)), lower_inf=True)
    upper = _kth(loo_pred_test + R, math.ceil((1 - alpha) * (n + 1)), lower_inf=False)
    return lower, upper


def jackknife_plus_sets(loo_proba_train: Tensor, y_train: Tensor, loo_proba_test: Tensor,
                        alpha: float) -> Tensor:
    """Conformal classification sets, jackknife+/CV+ style, with the score 1 − p̂(y | x).

    Args:
      loo_proba_train: (n, c) p̂_(i)(· | x_i).
      y_train: (n,) labels.
      loo_proba_test: (n, m, c) p̂_(i)(· | x) for every test point.
      alpha: miscoverage level.

    Returns:
      (m, c) bool membership: ``sets[j, y]`` is True when label y is in the set of test point j.
    """
    alpha = check_alpha(alpha)
    n = loo_proba_train.shape[0]
    if y_train.shape != (n,) or loo_proba_test.shape[0] != n:
        raise InputError(f"expected {n} training labels and {n} rows of test probabilities, got "
                         f"{tuple(y_train.shape)} and {tuple(loo_proba_test.shape)}")
    R = 1 - loo_proba_train.gather(1, y_train[:, None])[:, 0]              # (n,)
    scores = 1 - loo_proba_test                                             # (n, m, c)
    exceed = (scores > R[:, None, None]).sum(0)                             # (m, c)
    return exceed < (1 - alpha) * (n + 1)


def endpoint_shift_bound(model_error: Tensor, model_of: Tensor, X_cal: Tensor, X_test: Tensor) -> Tensor:
    """How far each jackknife+/CV+ end point of a linear regression can be from the exact-refit one.

    Args:
      model_error: (K,) ‖θ_k − θ_exact,k‖ of each leave-out model (e.g. DeltaGrad's ``error_absolute``).
      model_of: (n,) the model that left each calibration point out.
      X_cal: (n, d) the calibration points; X_test: (m, d) the test rows.

    Returns (m,): for f(x; θ) = w·x + b, |f(x; θ_k) − f(x; θ_exact,k)| ≤ ‖(x, 1)‖·e_k (Cauchy–Schwarz),
    so every term μ_k(x) ± R_i of the end points' order statistics moves by at most
    e_k(i)·(‖(x, 1)‖ + ‖(x_i, 1)‖); an order statistic moves by at most the largest move of its terms,
    so both end points move by at most ‖(x, 1)‖·max_k e_k + max_i e_k(i)·‖(x_i, 1)‖. It holds as
    far as the errors ``model_error`` do.
    """
    e = model_error.double()
    cal = e[model_of] * (X_cal.double().pow(2).sum(1) + 1).sqrt()
    return (X_test.double().pow(2).sum(1) + 1).sqrt() * e.max() + cal.max()


# the Lipschitz constant of a softmax probability in its logits: ∂p_y/∂z = p_y(e_y − p), whose norm is at
# most p_y·√((1 − p_y)² + Σ_{j≠y} p_j²) ≤ √2·p_y(1 − p_y) ≤ √2/4
SOFTMAX_LIPSCHITZ = 2 ** 0.5 / 4


def score_shift_bound(model_error: Tensor, model_of: Tensor, X_cal: Tensor, X_test: Tensor) -> Tensor:
    """How far each comparison behind a multinomial logistic regression's jackknife+/CV+ sets can move.

    Args: as :func:`endpoint_shift_bound`.

    Returns (m,): for logits z = Wx + b, ‖z(θ') − z(θ)‖ ≤ ‖(x, 1)‖·‖θ' − θ‖ (Cauchy–Schwarz per class
    row), so every probability, and every conformity score 1 − p̂(y | x), moves by at most
    :data:`SOFTMAX_LIPSCHITZ`·‖(x, 1)‖·e_k. Label y is in the set of x when #{i : s_i(x, y) > R_i} is
    below a threshold; each difference s_i(x, y) − R_i moves by at most
    Δ(x) = √2/4·(‖(x, 1)‖·max_k e_k + max_i e_k(i)·‖(x_i, 1)‖). A comparison farther than Δ(x) from 0
    cannot flip, which :func:`~.streaming.streamed_sets` turns into memberships certain to equal the
    exact refits'. It holds as far as the errors ``model_error`` do.
    """
    return SOFTMAX_LIPSCHITZ * endpoint_shift_bound(model_error, model_of, X_cal, X_test)

