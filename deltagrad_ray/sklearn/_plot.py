"""Prediction intervals on a matplotlib Axes, from MAPIE-shaped arrays (ours or MAPIE's)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core import InputError


def _vector(v: Any, name: str) -> np.ndarray:
    if hasattr(v, "detach"):            # a torch tensor, on any device
        v = v.detach().cpu().numpy()
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise InputError(f"{name} must be one value per test row, (m,), got shape {a.shape}")
    return a


def plot_intervals(y_test: Any, y_pred: Any, y_pis: Any, ax: Any = None, *, level: int = 0, limit: int = 60,
                   title: str | None = None):
    """Prediction intervals, point predictions and (optionally) the truth of up to ``limit`` test rows.

    The rows are sorted by prediction; when there are more than ``limit``, that many are taken at
    evenly spaced ranks. Each row is a vertical bar (its interval), a dot (its prediction) and a cross
    (its true value; red when outside the interval). The legend gives the coverage over all rows.
    Draws on ``ax``, or on a new figure from ``matplotlib.pyplot.subplots``; it never shows or saves,
    so it works under any backend, Agg included.

    Args:
      y_test: true values (m,), or None to leave them out.
      y_pred: point predictions (m,), e.g. the first output of ``predict_interval``.
      y_pis: intervals, (m, 2) or MAPIE's (m, 2, n_levels) (lower ``[:, 0]``, upper ``[:, 1]``); NumPy
        arrays or torch tensors.
      ax: a matplotlib Axes to draw on (default: a new figure's).
      level: which confidence level of a (m, 2, n_levels) ``y_pis`` to draw.
      limit: the most rows drawn.
      title: the Axes' title (default: "Prediction intervals").

    Returns:
      The matplotlib Axes (its figure is ``ax.figure``).

    Example:
      >>> from sklearn.datasets import load_diabetes
      >>> from deltagrad_ray.sklearn import CrossConformalRegressor, DeltaGradRegressor, plot_intervals
      >>> X, y = load_diabetes(return_X_y=True)
      >>> cp = CrossConformalRegressor(DeltaGradRegressor(), confidence_level=0.9, cv=10, random_state=0)
      >>> y_pred, y_pis = cp.fit_conformalize(X[:300], y[:300]).predict_interval(X[300:])
      >>> ax = plot_intervals(y[300:], y_pred, y_pis)
      >>> ax.figure.savefig("intervals.png")                     # doctest: +SKIP
    """
    if hasattr(y_pis, "detach"):
        y_pis = y_pis.detach().cpu().numpy()
    pis = np.asarray(y_pis, dtype=np.float64)
    if pis.ndim == 3:
        if not 0 <= level < pis.shape[2]:
            raise InputError(f"level must be in [0, {pis.shape[2]}) for y_pis of shape {pis.shape}, got {level!r}")
        pis = pis[:, :, level]
    if pis.ndim != 2 or pis.shape[1] != 2:
        raise InputError(f"y_pis must have shape (m, 2) or (m, 2, n_levels), got {pis.shape}")
    pred = _vector(y_pred, "y_pred")
    if len(pred) != len(pis):
        raise InputError(f"y_pred has {len(pred)} rows and y_pis {len(pis)}; expected one interval per prediction")
    truth = None if y_test is None else _vector(y_test, "y_test")
    if truth is not None and len(truth) != len(pred):
        raise InputError(f"y_test has {len(truth)} rows and y_pred {len(pred)}; expected one truth per prediction")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(f"limit must be an integer >= 1, got {limit!r}")
    if ax is None:
        import matplotlib.pyplot as plt
        _, ax = plt.subplots(figsize=(6.5, 3.4))
    order = np.argsort(pred, kind="stable")
    if len(order) > limit:
        order = order[np.linspace(0, len(order) - 1, limit).round().astype(int)]
    xs = np.arange(len(order))
    lo, hi = pis[order, 0], pis[order, 1]
    ax.vlines(xs, lo, hi, color="#4c72b0", alpha=0.6, label="interval")
    ax.plot(xs, pred[order], ".", color="#4c72b0", label="prediction")
    if truth is not None:
        inside = (truth >= pis[:, 0]) & (truth <= pis[:, 1])
        t, ins = truth[order], inside[order]
        ax.plot(xs[ins], t[ins], "x", color="#55a868", label=f"truth (coverage {inside.mean():.3f})")
        if (~ins).any():
            ax.plot(xs[~ins], t[~ins], "x", color="#c44e52", label="truth outside")
    ax.set_xlabel("test rows (sorted by prediction)" if len(pred) <= limit
                  else f"{len(order)} of {len(pred)} test rows (sorted by prediction)")
    ax.set_title("Prediction intervals" if title is None else title)
    ax.legend(fontsize=8)
    return ax
