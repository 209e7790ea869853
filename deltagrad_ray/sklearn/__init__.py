"""The scikit-learn face: estimators that can forget training rows, and MAPIE-shaped conformal prediction.

* :class:`DeltaGradClassifier` (logistic regression, ReLU MLP) and :class:`DeltaGradRegressor`
  (least squares, ReLU MLP): scikit-learn estimators whose training is recorded, with
  ``forget(indices)``, ``forget_many(index_sets)`` (with ``verify=K``: a statement on all of them
  from K retrained exactly) and ``loo_predict(X)``.
* :class:`CrossConformalRegressor` and :class:`CrossConformalClassifier`: MAPIE 1.x's classes of the
  same names (constructor, ``fit_conformalize``, ``predict_interval`` / ``predict_set``, ``predict``),
  whose leave-one-out or K-fold refits are DeltaGrad replays, batched.
* :func:`plot_intervals`: their (or MAPIE's) prediction intervals, points and true values on a
  matplotlib Axes.

Example:
    >>> from deltagrad_ray.sklearn import CrossConformalRegressor, DeltaGradRegressor
    >>> cp = CrossConformalRegressor(DeltaGradRegressor(steps=100), confidence_level=0.9, cv=-1)
    >>> cp.fit_conformalize(X_train, y_train)                       # doctest: +SKIP
    >>> y_pred, y_intervals = cp.predict_interval(X_test)           # doctest: +SKIP
"""

from ._conformal import (CrossConformalClassifier as CrossConformalClassifier,
                         CrossConformalRegressor as CrossConformalRegressor)
from ._estimators import (DeltaGradClassifier as DeltaGradClassifier, DeltaGradRegressor as DeltaGradRegressor,
                          Forgotten as Forgotten)
from ._plot import plot_intervals as plot_intervals

__all__ = ["CrossConformalClassifier", "CrossConformalRegressor", "DeltaGradClassifier", "DeltaGradRegressor",
           "Forgotten", "plot_intervals"]
