"""MAPIE 1.x's cross-conformal classes, with the refits replaced by DeltaGrad replays.

``CrossConformalRegressor`` and ``CrossConformalClassifier`` take MAPIE's constructor arguments and
methods (``fit_conformalize``, ``predict_interval`` / ``predict_set``, ``predict``,
``conformity_scores``, ``reset``), so that switching from MAPIE is an import change. Where MAPIE
clones the estimator and fits it once per fold, these fit it once, recording the trajectory, and
replay that trajectory without each fold (Wu et al. 2020), all folds batched in one pass.

The statistics are MAPIE's (and, for regression, those of :mod:`deltagrad_ray.stats`):

* regression, ``method="plus"``: jackknife+ / CV+ (Barber, Candès, Ramdas & Tibshirani 2021),
  Ĉ(x) = [q̂⁻{μ̂_(i)(x) − R_i}, q̂⁺{μ̂_(i)(x) + R_i}] with R_i = |y_i − μ̂_(i)(x_i)| and μ̂_(i) the model
  fitted without i's fold; ``"base"``: μ̂(x) ± q̂⁺{R_i}; ``"minmax"``: [min_i μ̂_(i)(x) − q̂⁺{R_i},
  max_i μ̂_(i)(x) + q̂⁺{R_i}] (jackknife-minmax);
* classification (LAC score, Sadinle, Lei & Wasserman 2019), s(x, y; μ) = 1 − p̂_μ(y | x),
  R_i = s(x_i, y_i; μ̂_(i)): ``agg_scores="mean"`` keeps y when s(x, y; p̄) ≤ q̂⁺{R_i} for the mean p̄ of
  the fold models' probabilities; ``"crossval"`` (Romano, Sesia & Candès 2020, Alg. 2, with MAPIE's
  threshold) keeps y when #{i : s(x, y; μ̂_(i)) ≤ R_i} ≥ α(n − 1). This threshold is MAPIE's;
  :func:`deltagrad_ray.stats.jackknife_plus_sets` uses #{i : s > R_i} < (1 − α)(n + 1), which can
  differ by one count at some n, so it is not used here.

q̂⁺ is the ⌈(1 − α)(n + 1)⌉-th smallest value, q̂⁻ the ⌊α(n + 1)⌋-th (MAPIE's finite-sample rule).

The estimator may also be a scikit-learn ``Pipeline`` whose last step is a DeltaGrad estimator, or (for
regression) a ``TransformedTargetRegressor`` around one (or around such a pipeline). The whole is fitted
once on all training rows; the fold models are DeltaGrad replays of the last step on the rows as the
fitted preprocessing transformed them, and their outputs go back through the fitted target transformer.
This differs from MAPIE, which refits the whole pipeline on each fold's training rows: here the
preprocessing (and the estimator's own standardisation) is the all-rows fit in every fold model, the
approximation a pipeline fitted once and then asked to forget rows makes. Its effect is measured in
``tests/sklearn/test_conformal.py`` against MAPIE's refits of the same pipeline.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from sklearn.compose import TransformedTargetRegressor
from sklearn.model_selection import BaseCrossValidator, KFold, LeaveOneOut
from sklearn.pipeline import Pipeline
from torch import Tensor

from ..core import ChangeSet, InputError
from ..stats import jackknife_plus_intervals
from ..stats.verification import Verification, check_settings
from ._estimators import VERIFY_CONFIDENCE, VERIFY_QUANTILE, DeltaGradClassifier, DeltaGradRegressor, _DeltaGradBase

EPSILON = 1e-8  # MAPIE's tolerance in set membership (mapie._machine_precision.EPSILON)
_TEST_CHUNK_VALUES = 1 << 22  # models × test rows evaluated at once (~32 MB of float64)


def _alphas(confidence_level: Any) -> list[float]:
    levels = [confidence_level] if isinstance(confidence_level, numbers.Real) else list(confidence_level)
    if not levels:
        raise InputError("confidence_level must be a number in (0, 1) or a non-empty list of them")
    for c in levels:
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 < c < 1:
            raise InputError(f"confidence_level must be in (0, 1), got {c!r}")
    return [1 - float(c) for c in levels]


def _check_cv(cv: Any, random_state: Any) -> BaseCrossValidator:
    """MAPIE's rule (mapie.utils._check_cv): -1 → leave-one-out, K ≥ 2 → shuffled K-fold."""
    if isinstance(cv, str):
        raise InputError(f"cv must be -1 (leave-one-out), an integer K >= 2 or a scikit-learn cross-validator, "
                         f"got {cv!r}")
    if random_state is None:
        random_state = np.random.choice(np.random.get_state()[1])  # as MAPIE draws it
    if isinstance(cv, numbers.Integral) and not isinstance(cv, bool):
        if cv == -1:
            return LeaveOneOut()
        if cv >= 2:
            return KFold(n_splits=int(cv), shuffle=True, random_state=random_state)
    if isinstance(cv, BaseCrossValidator):
        return cv
    raise InputError(f"cv must be -1 (leave-one-out), an integer K >= 2 or a scikit-learn cross-validator, got {cv!r}")


def _final_step(estimator: Any, kind: type) -> tuple[Any, list, list]:
    """The DeltaGrad estimator at the end of ``estimator`` (a ``kind``, a Pipeline ending in one, or a
    TransformedTargetRegressor around either), with the (fitted) X transformers before it, outermost
    first, and the TransformedTargetRegressors around it, outermost first. Unfitted wrappers give their
    unfitted parts (a check before fitting)."""
    if isinstance(estimator, kind):
        return estimator, [], []
    if isinstance(estimator, Pipeline) and estimator.steps:
        last = estimator.steps[-1][1]
        inner, pre, targets = _final_step(last, kind)
        head = estimator[:-1] if len(estimator.steps) > 1 else None
        return inner, ([head] if head is not None else []) + pre, targets
    if isinstance(estimator, TransformedTargetRegressor) and kind is DeltaGradRegressor:
        fitted = getattr(estimator, "regressor_", None)
        inner, pre, targets = _final_step(estimator.regressor if fitted is None else fitted, kind)
        return inner, pre, [estimator] + targets
    wrappers = "a Pipeline ending in one" + (" or a TransformedTargetRegressor around one"
                                             if kind is DeltaGradRegressor else "")
    raise InputError(f"estimator must be a {kind.__name__} or {wrappers} (its refits are DeltaGrad replays), "
                     f"got {type(estimator).__name__}")


def _kth(values: Tensor, k: int) -> Tensor:
    """k-th smallest (1-based) along dim 0."""
    return torch.kthvalue(values, k, dim=0).values


class _CrossConformal:
    """Fitting and state shared by the regressor and the classifier."""

    _estimator_type: type = _DeltaGradBase
    _scores: tuple[str, ...] = ()

    def _init(self, estimator, confidence_level, conformity_score, cv, n_jobs, verbose, random_state,
              backend, batch_size, exact, verify) -> None:
        if conformity_score not in self._scores:
            raise InputError(f"conformity_score must be {' or '.join(repr(s) for s in self._scores)} here, "
                             f"got {conformity_score!r}")
        self.estimator = estimator
        self.confidence_level = confidence_level
        self.conformity_score = conformity_score
        self.cv = cv
        self.n_jobs = n_jobs          # accepted for MAPIE compatibility; the refits are batched replays
        self.verbose = verbose
        self.random_state = random_state
        self.backend = backend
        self.batch_size = batch_size
        self.exact = exact
        self.verify = verify
        if verify is not None:
            check_settings(verify, VERIFY_QUANTILE, VERIFY_CONFIDENCE)
        self._alphas = _alphas(confidence_level)
        if isinstance(cv, str):
            _check_cv(cv, 0)  # raises: MAPIE refuses strings here too ("split", "prefit")
        self.is_fitted_and_conformalized = False

    def reset(self):
        """Discard the fitted models and conformity scores, so that :meth:`fit_conformalize` can run again."""
        self.is_fitted_and_conformalized = False
        for name in ("estimator_", "_core", "_pre", "_targets", "_thetas", "_model_of", "_scores_", "_y", "_oof",
                     "verification_"):
            self.__dict__.pop(name, None)
        return self

    def _fit(self, X: Any, y: Any, groups: Any, fit_params: dict | None, predict_params: dict | None) -> None:
        if self.is_fitted_and_conformalized:
            warnings.warn(f"{type(self).__name__}.fit_conformalize was already called; conformity scores from "
                          "the previous fit will be discarded. Call .reset() explicitly before fit_conformalize "
                          "to suppress this warning.", UserWarning, stacklevel=3)
            self.reset()
        if fit_params or predict_params:
            raise InputError("fit_params and predict_params are not used by DeltaGrad estimators; leave them empty")
        base = self._default() if self.estimator is None else self.estimator
        if not isinstance(base, (Pipeline, TransformedTargetRegressor)) and not isinstance(base, self._estimator_type):
            raise InputError(f"estimator must be a {self._estimator_type.__name__} (its refits are DeltaGrad replays), "
                             f"got {type(base).__name__}")
        _final_step(base, self._estimator_type)  # the structure, before the (costly) fit
        fitted = clone(base).fit(X, y)
        est, self._pre, self._targets = _final_step(fitted, self._estimator_type)
        self._core = est
        data = est._training_data()
        n = len(data)
        y_obs = np.asarray(y).reshape(n) if y is not None else est._training_labels()  # as given, in y's units
        cv = _check_cv(self.cv, self.random_state)  # at fit time, as MAPIE does (its seed is drawn then)
        folds = [np.asarray(test, dtype=np.int64) for _, test in cv.split(np.zeros((n, 1)), y_obs, groups)]
        count = np.zeros(n, dtype=np.int64)
        for f in folds:
            np.add.at(count, f, 1)
        if (count != 1).any():
            i = int(np.flatnonzero(count != 1)[0])
            raise InputError(f"cv must put every training row in exactly one test fold; row {i} is in {count[i]}")
        thetas = est._replay_many([ChangeSet(torch.from_numpy(f)) for f in folds], exact=bool(self.exact),
                                  backend=self.backend, batch_size=self.batch_size)
        if self.verify is not None:
            self.verification_ = self._verification(est, folds, thetas)
        model_of = torch.empty(n, dtype=torch.int64)
        for k, f in enumerate(folds):
            model_of[torch.from_numpy(f)] = k
        # out-of-fold outputs of the calibration rows: each row by the model fitted without its fold
        self._thetas = thetas
        own = torch.cat([self._out(thetas[k:k + 1], data.X[torch.from_numpy(f)])[0] for k, f in enumerate(folds)])
        order = torch.from_numpy(np.concatenate(folds))
        oof = torch.empty_like(own)
        oof[order] = own
        self.estimator_ = fitted
        labels = data.y if est._task == "classification" else torch.as_tensor(np.asarray(y_obs, dtype=np.float64),
                                                                                  device=oof.device)
        self._model_of, self._y, self._oof = model_of.to(thetas.device), labels, oof
        self._scores_ = self._conformity(oof, labels)
        self.is_fitted_and_conformalized = True

    def _verification(self, est: _DeltaGradBase, folds: list[np.ndarray], thetas: Tensor) -> Verification:
        """``verify`` of the fold models drawn at random (seeded by ``random_state`` when it is an
        integer) and retrained exactly (:meth:`_DeltaGradBase._verified`)."""
        seed = self.random_state if isinstance(self.random_state, numbers.Integral) else 0
        return est._verified([ChangeSet(torch.from_numpy(f)) for f in folds], thetas, self.verify, int(seed),
                             self.backend, self.batch_size)

    def _rows(self, X: Any) -> Tensor:
        """Test rows through the fitted preprocessing, standardised as the final step's training rows."""
        for pre in self._pre:
            X = pre.transform(X)
        return self._core._predict_tensor(X)

    def _out(self, thetas: Tensor, Xt: Tensor) -> Tensor:
        """Outputs of B final-step models on m rows, in the units of y (through the target transformers)."""
        out = self._core._outputs(thetas, Xt)
        for ttr in reversed(self._targets):  # innermost first
            shape = out.shape
            back = ttr.transformer_.inverse_transform(out.reshape(-1, 1).cpu().double().numpy())
            out = torch.as_tensor(np.asarray(back, dtype=np.float64).reshape(shape), dtype=out.dtype,
                                  device=out.device)
        return out

    def _check_fitted(self, method: str) -> None:
        if not self.is_fitted_and_conformalized:
            raise InputError(f"call fit_conformalize before {method}")

    @property
    def conformity_scores(self) -> np.ndarray:
        """The conformity scores R_i of the training rows (out-of-fold), (n,)."""
        self._check_fitted("conformity_scores")
        return self._scores_.cpu().double().numpy()

    def _test_chunks(self, Xt: Tensor):
        """Test rows in chunks small enough that (models × rows) outputs stay bounded."""
        per_row = self._thetas.shape[0] * len(getattr(self._core, "classes_", [0]))  # models × outputs
        step = max(1, _TEST_CHUNK_VALUES // max(1, per_row))
        for a in range(0, Xt.shape[0], step):
            yield a, Xt[a:a + step]

    def _q_plus(self, alpha: float, allow_infinite: bool) -> int | None:
        """⌈(1 − α)(n + 1)⌉, or None when it exceeds n (an unbounded interval)."""
        n = self._scores_.shape[0]
        k = math.ceil((1 - alpha) * (n + 1))
        if k > n:
            if not allow_infinite:
                raise InputError(f"{n} calibration rows are too few for confidence level {1 - alpha:g} "
                                 f"(at least {math.ceil(1 / alpha) - 1} needed); lower it or set "
                                 "allow_infinite_bounds=True")
            return None
        return k


class CrossConformalRegressor(_CrossConformal):
    """Jackknife+, CV+ and their variants with MAPIE 1.x's interface; the refits are DeltaGrad replays.

    Args:
      estimator: a :class:`DeltaGradRegressor` (default: ``DeltaGradRegressor()``), a ``Pipeline`` ending in
        one, or a ``TransformedTargetRegressor`` around either; cloned and fitted once on all rows. The
        fold models replay the DeltaGrad step; a pipeline's preprocessing and a target transformer stay
        as fitted on all rows (MAPIE refits them per fold; see the module docstring).
      confidence_level: 1 − α, a number or a list of them (one interval per level).
      conformity_score: ``"absolute"`` (|y − ŷ|, MAPIE's default; the only one here).
      method: ``"plus"`` (jackknife+ / CV+), ``"base"`` or ``"minmax"``.
      cv: ``-1`` or ``LeaveOneOut()`` (jackknife), an integer K ≥ 2 (shuffled K-fold, seeded by
        ``random_state`` as MAPIE seeds it), or any scikit-learn cross-validator whose test folds
        partition the rows.
      n_jobs, verbose: accepted for MAPIE compatibility; not used (the replays are batched).
      random_state: seed of the K-fold shuffle.
      backend: where the replays run: None / ``"serial"``, ``"ray"`` or a backend object (Ray needs an
        estimator fitted with ``cache=``); see :meth:`DeltaGradRegressor.forget_many`.
      batch_size: replays batched per pass over the trajectory.
      exact: refit every fold by exact retraining instead (for verification).
      verify: K, to also retrain K fold models drawn at random exactly: ``verification_`` then states,
        with probability >= 95% over the draw, a bound on the error of 95% of ALL fold models
        (‖θ_DeltaGrad − θ_exact‖ / ‖θ_exact − θ_full‖; K >= 59 for a bound; README, Verification).

    Memory: the fold models' parameters (K × p floats; n × p for leave-one-out) and, while
    predicting, outputs of the models on chunks of test rows (about 32 MB at a time).

    Example:
      >>> from sklearn.datasets import load_diabetes
      >>> X, y = load_diabetes(return_X_y=True)
      >>> cp = CrossConformalRegressor(DeltaGradRegressor(), confidence_level=0.9, cv=-1)
      >>> y_pred, y_pis = cp.fit_conformalize(X[:300], y[:300]).predict_interval(X[300:])
      >>> y_pis.shape
      (142, 2, 1)
    """

    _estimator_type = DeltaGradRegressor
    _scores = ("absolute",)
    _METHODS = ("base", "plus", "minmax")

    def __init__(self, estimator: DeltaGradRegressor | None = None, confidence_level: float | list[float] = 0.9,
                 conformity_score: str = "absolute", method: str = "plus", cv: Any = 5, n_jobs: int | None = None,
                 verbose: int = 0, random_state: Any = None, *, backend: Any = None, batch_size: int = 32,
                 exact: bool = False, verify: int | None = None) -> None:
        if method not in self._METHODS:
            raise InputError(f"method must be one of {', '.join(self._METHODS)}, got {method!r}")
        self.method = method
        self._init(estimator, confidence_level, conformity_score, cv, n_jobs, verbose, random_state, backend,
                   batch_size, exact, verify)

    @staticmethod
    def _default() -> DeltaGradRegressor:
        return DeltaGradRegressor()

    def _conformity(self, oof: Tensor, y: Tensor) -> Tensor:
        return (y.to(oof.dtype) - oof).abs()

    def fit_conformalize(self, X: Any, y: Any, groups: Any = None, fit_params: dict | None = None,
                         predict_params: dict | None = None) -> CrossConformalRegressor:
        """Fit the estimator on all rows (recording its trajectory), replay it without each fold, and
        compute the out-of-fold conformity scores.

        Args:
          X, y: training rows, in any form the estimator's ``fit`` takes.
          groups: groups for the cross-validator (e.g. ``GroupKFold``).
          fit_params, predict_params: must be empty (MAPIE compatibility).

        Returns:
          self.
        """
        self._fit(X, y, groups, fit_params, predict_params)
        return self

    def _multi(self, Xt: Tensor) -> Tensor:
        """μ̂_(i)(x) for every training row i and test row x: (n, m) (each row i's fold model)."""
        return self._out(self._thetas, Xt)[self._model_of]

    def _points(self, multi: Tensor, single: Tensor, aggregate: str | None) -> Tensor:
        if aggregate not in (None, False, "mean", "median"):
            raise InputError(f"aggregate_point_predictions must be None, 'mean' or 'median', got {aggregate!r}")
        if not aggregate or self.method == "base":  # MAPIE's "base" points are the full model's
            return single
        if aggregate == "mean":
            return multi.mean(0)
        if aggregate == "median":
            return multi.median(0).values if multi.shape[0] % 2 else multi.double().quantile(0.5, dim=0).to(multi.dtype)
        raise AssertionError(aggregate)

    def predict_interval(self, X: Any, aggregate_point_predictions: str | None = "mean",
                         minimize_interval_width: bool = False, allow_infinite_bounds: bool = False
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Points and prediction intervals for the rows of ``X``.

        Args:
          X: rows to predict (m).
          aggregate_point_predictions: ``"mean"`` / ``"median"`` of the fold models' predictions (over
            the training rows, as MAPIE aggregates them), or None for the model fitted on all rows
            (always so for ``method="base"``, as in MAPIE). MAPIE 1.6 returns the mean when asked for
            the median (its aggregation setting does not reach its ensemble); here it is the median.
          minimize_interval_width: not available for the symmetric absolute score (as in MAPIE).
          allow_infinite_bounds: allow ±inf bounds when there are too few rows for a level.

        Returns:
          (points (m,), intervals (m, 2, n_levels)): ``[:, 0, j]`` lower, ``[:, 1, j]`` upper bounds.
        """
        self._check_fitted("predict_interval")
        if minimize_interval_width:
            raise InputError("minimize_interval_width cannot be used with the symmetric absolute conformity score")
        est = self._core
        Xt = self._rows(X)
        ks = [self._q_plus(a, allow_infinite_bounds) for a in self._alphas]
        R = self._scores_
        y_cal = self._y.to(R.dtype)
        points, bounds = [], []
        for _, part in self._test_chunks(Xt):
            single = self._out(est.params_[None], part)[0]
            multi = self._multi(part)
            points.append(self._points(multi, single, aggregate_point_predictions))
            per_level = []
            for a, k in zip(self._alphas, ks):
                if self.method == "plus":
                    lo, hi = jackknife_plus_intervals(self._oof, y_cal, multi, a)  # R_i = |y_i − μ̂_(i)(x_i)|
                else:
                    q = math.inf if k is None else float(_kth(R, k))
                    lo_c, hi_c = (single, single) if self.method == "base" else (multi.min(0).values,
                                                                                  multi.max(0).values)
                    lo, hi = lo_c - q, hi_c + q
                per_level.append(torch.stack([lo, hi], dim=1))
            bounds.append(torch.stack(per_level, dim=2))
        return torch.cat(points).cpu().double().numpy(), torch.cat(bounds).cpu().double().numpy()

    def predict(self, X: Any, aggregate_point_predictions: str | None = "mean") -> np.ndarray:
        """Point predictions (m,): the fold models' mean (default), median, or (None) the full model's."""
        self._check_fitted("predict")
        est = self._core
        Xt = self._rows(X)
        out = []
        for _, part in self._test_chunks(Xt):
            single = self._out(est.params_[None], part)[0]
            multi = self._multi(part) if aggregate_point_predictions and self.method != "base" else single[None]
            out.append(self._points(multi, single, aggregate_point_predictions))
        return torch.cat(out).cpu().double().numpy()


class CrossConformalClassifier(_CrossConformal):
    """Cross-conformal prediction sets with MAPIE 1.x's interface; the refits are DeltaGrad replays.

    Args:
      estimator: a :class:`DeltaGradClassifier` (default: ``DeltaGradClassifier()``), or a ``Pipeline``
        ending in one (its preprocessing fitted once on all rows, as for the regressor).
      confidence_level: 1 − α, a number or a list of them (one set per level).
      conformity_score: ``"lac"`` (1 − p̂(y | x), MAPIE's default; the only one here).
      cv, n_jobs, verbose, random_state, backend, batch_size, exact, verify: as :class:`CrossConformalRegressor`.

    Memory: K × p fold parameters (n × p for leave-one-out) and the models' probabilities on
    chunks of test rows.

    Example:
      >>> from sklearn.datasets import load_wine
      >>> X, y = load_wine(return_X_y=True)
      >>> cp = CrossConformalClassifier(DeltaGradClassifier(), confidence_level=0.9, cv=10, random_state=0)
      >>> labels, sets = cp.fit_conformalize(X[:150], y[:150]).predict_set(X[150:])
      >>> sets.shape
      (28, 3, 1)
    """

    _estimator_type = DeltaGradClassifier
    _scores = ("lac",)

    def __init__(self, estimator: DeltaGradClassifier | None = None, confidence_level: float | list[float] = 0.9,
                 conformity_score: str = "lac", cv: Any = 5, n_jobs: int | None = None, verbose: int = 0,
                 random_state: Any = None, *, backend: Any = None, batch_size: int = 32, exact: bool = False,
                 verify: int | None = None) -> None:
        self._init(estimator, confidence_level, conformity_score, cv, n_jobs, verbose, random_state, backend,
                   batch_size, exact, verify)

    @staticmethod
    def _default() -> DeltaGradClassifier:
        return DeltaGradClassifier()

    def _conformity(self, oof: Tensor, y: Tensor) -> Tensor:
        return 1 - torch.softmax(oof, dim=-1).gather(1, y[:, None].to(oof.device))[:, 0]

    def fit_conformalize(self, X: Any, y: Any, groups: Any = None, fit_params: dict | None = None,
                         predict_params: dict | None = None) -> CrossConformalClassifier:
        """Fit the classifier on all rows (recording its trajectory), replay it without each fold, and
        compute the out-of-fold conformity scores. Arguments as :meth:`CrossConformalRegressor.fit_conformalize`.

        Returns:
          self.
        """
        self._fit(X, y, groups, fit_params, predict_params)
        return self

    def predict_set(self, X: Any, conformity_score_params: dict | None = None,
                    agg_scores: str = "mean") -> tuple[np.ndarray, np.ndarray]:
        """Labels (the model fitted on all rows) and prediction sets for the rows of ``X``.

        Args:
          X: rows to predict (m).
          conformity_score_params: must be empty (the LAC score has none).
          agg_scores: ``"mean"`` (mean of the fold models' probabilities against the conformity
            quantile) or ``"crossval"`` (each fold model against its own rows' scores).

        Returns:
          (labels (m,), sets (m, c, n_levels) bool), classes in the order of ``estimator_.classes_``.
        """
        self._check_fitted("predict_set")
        if conformity_score_params:
            raise InputError("conformity_score_params do not apply to the LAC score; leave them empty")
        if agg_scores not in ("mean", "crossval"):
            raise InputError(f"agg_scores must be 'mean' or 'crossval', got {agg_scores!r}")
        est = self._core
        Xt = self._rows(X)
        R = self._scores_
        n = R.shape[0]
        qs = []
        if agg_scores == "mean":
            for a in self._alphas:
                k = self._q_plus(a, False)
                qs.append(float(_kth(R, k)))
        labels, sets = [], []
        for _, part in self._test_chunks(Xt):
            labels.append(est._outputs(est.params_[None], part)[0].argmax(-1))
            P = est._proba(self._thetas, part)                                    # (K, m, c)
            if agg_scores == "mean":
                score = 1 - P.mean(0)                                             # (m, c)
                per_level = [(score - q) <= EPSILON for q in qs]
            else:
                # #{i : s(x, y; μ̂_(i)) ≤ R_i}, each row i against its own fold model
                included = torch.zeros(P.shape[1:], dtype=torch.int64, device=P.device)
                for k in range(P.shape[0]):
                    Rk = R[self._model_of == k]
                    included += (((1 - P[k])[None] - Rk[:, None, None]) <= EPSILON).sum(0)
                per_level = [(included - a * (n - 1)) >= -EPSILON for a in self._alphas]
            sets.append(torch.stack(per_level, dim=2))
        labels_idx = torch.cat(labels).cpu().numpy()
        return est.classes_[labels_idx], torch.cat(sets).cpu().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Labels predicted by the model fitted on all rows (m,)."""
        self._check_fitted("predict")
        return self.estimator_.predict(X)
