"""plot_intervals: it draws every interval, prediction and true value it is given, on the Agg backend."""

import matplotlib

matplotlib.use("Agg")  # no display under test

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_diabetes  # noqa: E402

from deltagrad_ray.core import InputError  # noqa: E402
from deltagrad_ray.sklearn import CrossConformalRegressor, plot_intervals  # noqa: E402


def drawn(ax):
    """(intervals (k, 2) by x, prediction points (k, 2), truth crosses (j, 2)) as drawn on ``ax``."""
    segs = np.array([s for c in ax.collections for s in c.get_segments()])   # each ((x, lo), (x, hi))
    assert np.array_equal(segs[:, 0, 0], segs[:, 1, 0])                      # vertical bars
    bars = np.column_stack([segs[:, 0, 0], segs[:, 0, 1], segs[:, 1, 1]])
    lines = {ln.get_label(): np.column_stack(ln.get_data()) for ln in ax.get_lines()}
    crosses = [v for k, v in lines.items() if k.startswith("truth")]
    return bars, lines["prediction"], np.vstack(crosses) if crosses else np.empty((0, 2))


@pytest.fixture(scope="module")
def intervals():
    """CV+ on raw diabetes (default estimator, no scaling by hand), replays and exact refits."""
    X, y = load_diabetes(return_X_y=True)
    Xtr, ytr, Xte, yte = X[:300], y[:300], X[300:], y[300:]
    kw = dict(confidence_level=[0.9, 0.8], cv=10, random_state=0)
    ours = CrossConformalRegressor(**kw).fit_conformalize(Xtr, ytr)
    exact = CrossConformalRegressor(**kw, exact=True).fit_conformalize(Xtr, ytr)
    # the replays against exact retraining of every fold: interval ends within 2% of the mean width, and the
    # scores moved from the full model's (what a no-op replay would give) to the refits'
    (p, pis), (pe, pise) = ours.predict_interval(Xte), exact.predict_interval(Xte)
    width = (pise[:, 1] - pise[:, 0]).mean(0)
    assert (np.abs(pis - pise).max(axis=(0, 1)) < 0.02 * width).all()
    assert np.abs(p - pe).max() < 0.02 * width.min()
    off = np.abs(ours.conformity_scores - exact.conformity_scores).max()
    noop = np.abs(np.abs(ytr - ours.estimator_.predict(Xtr)) - exact.conformity_scores).max()
    assert noop > 0 and off < 0.05 * noop, (off, noop)
    return yte, p, pis


def test_draws_every_interval_and_point(intervals):
    yte, p, pis = intervals
    ax = plot_intervals(yte, p, pis, level=1, limit=len(p))
    try:
        assert isinstance(ax, matplotlib.axes.Axes)
        bars, points, crosses = drawn(ax)
        order = np.argsort(p, kind="stable")
        x = np.arange(len(p))
        assert np.array_equal(bars, np.column_stack([x, pis[order, 0, 1], pis[order, 1, 1]]))
        assert np.array_equal(points, np.column_stack([x, p[order]]))
        assert np.array_equal(crosses[np.argsort(crosses[:, 0])], np.column_stack([x, yte[order]]))
        inside = ((yte >= pis[:, 0, 1]) & (yte <= pis[:, 1, 1])).mean()
        assert 0.7 < inside < 0.95                                     # an 80% level, 142 rows
        assert f"coverage {inside:.3f}" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
        assert ax.get_title() == "Prediction intervals"
    finally:
        plt.close(ax.figure)


def test_limit_torch_inputs_and_a_given_axes(intervals):
    yte, p, pis = intervals
    fig, given = plt.subplots()
    try:
        ax = plot_intervals(None, torch.tensor(p), torch.tensor(pis[:, :, 0]), ax=given, limit=20, title="CV+")
        assert ax is given and ax.get_title() == "CV+"
        bars, points, crosses = drawn(ax)
        assert len(bars) == len(points) == 20 and len(crosses) == 0   # no truth given, none drawn
        order = np.argsort(p, kind="stable")
        ranks = np.linspace(0, len(p) - 1, 20).round().astype(int)   # evenly spaced ranks, both ends
        assert np.array_equal(points[:, 1], p[order[ranks]])
        assert np.array_equal(bars[:, 1:], pis[order[ranks], :, 0])
        assert ax.get_xlabel() == f"20 of {len(p)} test rows (sorted by prediction)"
    finally:
        plt.close(fig)


def test_bad_input(intervals):
    yte, p, pis = intervals
    with pytest.raises(InputError, match=r"level must be in \[0, 2\) for y_pis of shape \(142, 2, 2\), got 2"):
        plot_intervals(yte, p, pis, level=2)
    with pytest.raises(InputError, match=r"y_pis must have shape \(m, 2\) or \(m, 2, n_levels\), got \(142, 3\)"):
        plot_intervals(yte, p, np.zeros((142, 3)))
    with pytest.raises(InputError, match="y_pred has 141 rows and y_pis 142"):
        plot_intervals(yte, p[1:], pis)
    with pytest.raises(InputError, match="y_test has 141 rows and y_pred 142"):
        plot_intervals(yte[1:], p, pis)
    with pytest.raises(InputError, match="limit must be an integer >= 1, got 0"):
        plot_intervals(yte, p, pis, limit=0)
    assert not plt.get_fignums()                                       # nothing drawn before the checks
