"""scikit-learn estimators whose training is recorded, so that rows can be forgotten cheaply.

``fit`` trains by gradient descent (or mini-batch SGD) and keeps the trajectory (θ_t, g_t per step,
Wu et al. 2020, Sec. 3) in memory, or writes it as a cache at ``cache=`` through the storage API.
``forget`` replays that trajectory without some rows (DeltaGrad, Alg. 1) instead of retraining;
``forget_many`` replays many such requests in batches; ``loo_predict`` gives every leave-one-out
model's predictions. With ``exact=True`` each of them retrains exactly instead (same θ_0, learning
rates, batch order and scaling: the ground truth DeltaGrad approximates).

Defaults that work without tuning (``standardize=True``, ``steps="auto"``, ``lr="auto"``):

* the features (and a regressor's targets) are standardised with the training rows' means and
  standard deviations, fixed at fit time; the trajectory is trained on the standardised rows, so the
  fit does not depend on their units, and forgetting rows keeps the scaling (as a ``Pipeline`` whose
  ``StandardScaler`` was fitted once on all rows would);
* η = 1/L for the linear kinds (L the smoothness bound of the objective), 0.5/|λ|max(∇²F(θ_0)) for the
  MLP (its curvature at the start, by Hessian-vector products);
* T: gradient descent runs until ‖∇F(θ_t)‖ ≤ tol·‖∇F(θ_0)‖ (at most :data:`AUTO_MAX_STEPS` steps), and the
  steps it took are the trajectory;
* a fit that ends with ‖∇F(θ_T)‖ > tol·‖∇F(θ_0)‖ warns (``ConvergenceWarning``), naming ``steps`` and ``lr``.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor, nn
from torch.func import vmap

from ..core import (DTYPES, BatchPlan, ChangeSet, Dataset, DeltaGradConfig, FunctionalModel, InMemory, InputError,
                    MemoryRecorder, ModelSpec, Trajectory, deltagrad, deltagrad_batched, gram_norm, hessian_norm,
                    learning_rates, changed_trajectory, make_change_set, retrain, run_sgd, train)
from ..stats.verification import Verification, check_settings, draw, verification
from ..store.inputs import check_finite, is_table, read_rows

if TYPE_CHECKING:
    from ..store.cache import Cache

VERIFY_QUANTILE = VERIFY_CONFIDENCE = 0.95  # verify=K: a bound on 95% of the models at 95% confidence
AUTO_MAX_STEPS = 1000   # steps="auto": gradient descent stops at tol or after this many steps
AUTO_SGD_EPOCHS = 10    # steps="auto" with optimizer="sgd": this many passes over the rows
MLP_LR_FACTOR = 0.5     # lr="auto" for the MLP: this over |λ|max of the Hessian at θ_0
CURVATURE_ROWS = 4096   # rows (evenly spaced) of the MLP's curvature estimate
GRADIENT_ROWS = 65536   # rows per chunk of the full gradient behind the convergence check


def _standardization(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations of (n, k) ``A``; 1 for a (numerically) constant column."""
    mean = A.mean(axis=0)
    scale = A.std(axis=0)
    constant = scale <= 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)
    scale[constant] = 1.0
    return mean, scale


def _full_gradient(fm: FunctionalModel, theta: Tensor, data: Dataset, l2: float) -> Tensor:
    """∇F(θ) = Σ_i ∇ℓ_i(θ)/n + λθ over every row of ``data`` (in chunks of rows)."""
    total = torch.zeros_like(theta)
    for a in range(0, len(data), GRADIENT_ROWS):
        total += fm.grad_sum(theta, data.X[a:a + GRADIENT_ROWS], data.y[a:a + GRADIENT_ROWS])
    return total / len(data) + l2 * theta


class _Reached(Exception):
    """Raised by :class:`_UntilTolerance` at the first step that meets the tolerance."""

    def __init__(self, step: int, theta: Tensor) -> None:
        super().__init__(step)
        self.step, self.theta = step, theta


class _UntilTolerance:
    """A recorder for ``steps="auto"`` under GD: keeps (θ_t, g_t) (when ``keep``) and stops training, by
    raising :class:`_Reached`, at the first θ_t with ‖g_t‖ ≤ tol·‖g_0‖, where g_t = ∇F(θ_t)."""

    def __init__(self, tol: float, keep: bool) -> None:
        self.tol, self.keep = tol, keep
        self.g0: float | None = None
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []

    def record(self, step: int, theta: Tensor, grad: Tensor) -> None:
        norm = float(torch.linalg.vector_norm(grad))
        if self.g0 is None:
            self.g0 = norm
        if norm <= self.tol * self.g0:
            raise _Reached(step, theta)
        if self.keep:  # the training loop makes new tensors each step (w = w − ηg): references suffice
            self.params.append(theta)
            self.grads.append(grad)

    def finish(self, lrs: Tensor) -> None:
        return None


def _gd_to_tolerance(fm: FunctionalModel, data: Dataset, lrs: Tensor, l2: float, seed: int, tol: float,
                     keep: bool) -> tuple[int, Trajectory | None]:
    """T for ``steps="auto"`` under GD — the first t with ‖∇F(θ_t)‖ ≤ tol·‖∇F(θ_0)‖, else len(lrs) — and,
    with ``keep``, the trajectory of those T steps.

    Runs the loop :func:`~deltagrad_ray.core.train` runs (the same θ_0, batch plan and operations),
    so the trajectory is the one ``train`` records for T steps, and exact retraining reproduces it.
    """
    plan = BatchPlan(len(data), None, seed)
    theta0 = fm.init_params(seed, dtype=data.X.dtype, device=data.X.device)
    rec = _UntilTolerance(tol, keep)
    try:
        final = run_sgd(fm, data, plan, lrs, l2, theta0, None, rec, check_growth=True)
        steps = int(lrs.shape[0])
    except _Reached as stop:
        if stop.step == 0:  # stationary at θ_0: one step, recorded by train()
            return 1, None
        final, steps = stop.theta, stop.step
    if not keep:
        return steps, None
    lrs = lrs[:steps]
    source = InMemory(torch.stack(rec.params[:steps]), torch.stack(rec.grads[:steps]), lrs)
    return steps, Trajectory(plan, float(l2), lrs.to(torch.float64).cpu(), theta0, final, len(data), None, source)


def _squared(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example ½(f(x) − y)² (the built-in linear model's loss)."""
    return 0.5 * (outputs.reshape(-1) - targets) ** 2


def _mlp_regression(d: int, hidden: tuple[int, ...], seed: int) -> FunctionalModel:
    """A ReLU network with one output and squared loss; its initial weights drawn from ``seed``."""
    widths = (d, *hidden, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b, dtype=torch.float64))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        return FunctionalModel(nn.Sequential(*layers), _squared, n_classes=None)


_NO_TRAJECTORY = ("this estimator holds no trajectory to replay (it came from forget_many(), or from forget() "
                  "on a cache without out_cache=); forget() in memory or with out_cache= returns estimators "
                  "that can forget again")
_UNPICKLED = ("this estimator was unpickled, and pickles carry what predict needs, not the in-memory trajectory; "
              "to forget after pickling, fit with cache=LOCATION (the trajectory stays on storage and is "
              "reloaded from there)")


class _Recording(ABC):
    """The fit's recorded training and the unlearning verbs' operations on it, wherever it is kept:
    :class:`_MemoryRecording` (fitted without ``cache=``) or :class:`_CachedRecording`.

    :meth:`_DeltaGradBase._recording` makes one per call from the fitted state (the trajectory and
    rows, or the cache's location); it is never stored on the estimator, so pickles stay light.
    """

    def __init__(self, est: _DeltaGradBase) -> None:
        self.est = est

    @property
    @abstractmethod
    def n_rows(self) -> int:
        """Rows given to fit, deleted ones included (row numbers keep their meaning after a forget)."""

    @abstractmethod
    def training_data(self) -> Dataset:
        """The rows the trajectory was trained on (standardised), on the estimator's device."""

    @abstractmethod
    def removed(self) -> Tensor | None:
        """(n_rows,) mask of the rows already deleted from the trajectory, or None for none."""

    @abstractmethod
    def forget(self, rows: Tensor, exact: bool, out_cache: str | None) -> tuple[Tensor, dict[str, Any]]:
        """θ trained without ``rows``, and the copy's fitted attributes: ``forget_report_`` and where
        it replays from next (``trajectory_`` or ``cache_``, None when it cannot)."""

    @abstractmethod
    def replay_many(self, changes: list[ChangeSet], exact: bool, backend: Any, batch_size: int) -> Tensor:
        """(B, p) parameters after each change set, replayed ``batch_size`` at a time on ``backend``."""

    def active_rows(self) -> Tensor:
        """Row numbers still in the model, ascending."""
        removed = self.removed()
        return torch.arange(self.n_rows) if removed is None else torch.nonzero(~removed.cpu()).reshape(-1)

    def _change(self, data: Dataset, removed: Tensor | None, rows: Tensor) -> ChangeSet:
        """The deletion of ``rows`` checked against ``data`` and the rows deleted before."""
        return make_change_set(data, delete_ids=data.ids[rows.to(data.ids.device)], removed=removed,
                               n_classes=self.est._n_classes())


class _MemoryRecording(_Recording):
    """The trajectory and the training rows held by the estimator; replays run in this process."""

    def __init__(self, est: _DeltaGradBase, traj: Trajectory, data: Dataset) -> None:
        super().__init__(est)
        self.traj, self.data = traj, data

    @property
    def n_rows(self) -> int:
        return len(self.data)

    def training_data(self) -> Dataset:
        return self.data

    def removed(self) -> Tensor | None:
        return self.traj.removed

    def forget(self, rows: Tensor, exact: bool, out_cache: str | None) -> tuple[Tensor, dict[str, Any]]:
        if out_cache is not None:
            raise InputError("out_cache applies to estimators fitted with cache=; this one keeps its "
                             "trajectory in memory")
        traj, data, fm = self.traj, self.data, self.est._fm
        change = self._change(data, traj.removed, rows)
        if exact:
            rec = MemoryRecorder(traj.steps, traj.p, traj.dtype, traj.initial.device)
            final = retrain(fm, traj, data, change, recorder=rec)
            new_traj = changed_trajectory(traj, data, change, final, rec)
            report = {"method": "exact", "steps": traj.steps}
        else:
            res = deltagrad(fm, traj, data, change, self.est._config_, record=True)
            final, new_traj, report = res.params, res.trajectory, {"method": "deltagrad", **res.diagnostics()}
        return final, {"trajectory_": new_traj, "forget_report_": report}

    def replay_many(self, changes: list[ChangeSet], exact: bool, backend: Any, batch_size: int) -> Tensor:
        if backend not in (None, "serial"):
            raise InputError(f"backend {backend!r} runs on caches: fit the estimator with cache=LOCATION "
                             "(the backend's workers load the trajectory from there)")
        traj, data, fm = self.traj, self.data, self.est._fm
        checked = [self._change(data, traj.removed, ch.delete) for ch in changes]
        if exact:
            return torch.stack([retrain(fm, traj, data, ch) for ch in checked])
        return deltagrad_batched(fm, traj, data, checked, self.est._config_, batch_size=batch_size).params


class _CachedRecording(_Recording):
    """A trajectory cache on storage, opened from ``cache_``; replays go through the storage API and
    the replay backends (serial or Ray), whose workers load the cache themselves."""

    def __init__(self, est: _DeltaGradBase, cache: Cache) -> None:
        super().__init__(est)
        self.cache = cache

    @property
    def n_rows(self) -> int:
        return int(self.cache.n_rows)

    def training_data(self) -> Dataset:
        return self.cache.data(device=self.est.device)

    def removed(self) -> Tensor | None:
        return self.cache.removed_mask()

    def forget(self, rows: Tensor, exact: bool, out_cache: str | None) -> tuple[Tensor, dict[str, Any]]:
        from .. import api
        from ..store.cache import open_cache
        c, device, ids = self.cache, self.est.device, rows.tolist()
        if exact:
            final = api.retrain_exact(c, delete=ids, device=device, out_cache=out_cache)
            report = {"method": "exact", "steps": c.steps}
        else:
            res = api.unlearn(c, delete=ids, config=self.est._config_, device=device, out_cache=out_cache)
            final, report = res.params, {"method": "deltagrad", **res.diagnostics()}
        new_cache = None if out_cache is None else open_cache(out_cache).uri
        return final.to(device=device), {"cache_": new_cache, "forget_report_": report}

    def replay_many(self, changes: list[ChangeSet], exact: bool, backend: Any, batch_size: int) -> Tensor:
        from .. import many
        c, est = self.cache, self.est
        data = c.data(device=est.device)
        removed = c.removed_mask()
        checked = [self._change(data, removed, ch.delete) for ch in changes]
        rep = many.Fanout(backend=self._backend(exact, backend), batch_size=batch_size,
                          config=est._config_).run(c, data, checked)
        if rep.errors:
            i, e = next(iter(rep.errors.items()))
            raise InputError(f"{len(rep.errors)} replay(s) failed, e.g. request {i}: {e}")
        return rep.params.to(dtype=est.params_.dtype, device=est.device)

    @staticmethod
    def _backend(exact: bool, backend: Any) -> Any:
        """The replay backend ``backend`` names (exact retraining has its own)."""
        from .. import many
        from ..distributed.backends import RayBackend, SerialBackend
        if exact:
            return many.ExactBackend()
        if backend in (None, "serial"):
            return SerialBackend()
        if backend == "ray":
            return RayBackend()
        if isinstance(backend, str):
            raise InputError(f"backend must be serial, ray or a backend object, got {backend!r}")
        return backend


class Forgotten(list):
    """What :meth:`forget_many` returns: the fitted copies (a list, in request order), and
    ``verification`` (a :class:`~deltagrad_ray.stats.verification.Verification`, or None when
    ``verify`` was not asked)."""

    verification: Verification | None = None


class _DeltaGradBase(BaseEstimator):
    """Shared parameters and the unlearning verbs (see the subclasses for the public docs)."""

    _kinds: tuple[str, ...] = ()
    _task = ""

    def __init__(self, model: str = "", *, hidden: Sequence[int] = (100,), optimizer: str = "gd",
                 steps: int | str = "auto", lr: float | str = "auto", milestones: Sequence[int] = (),
                 gamma: float = 0.1, l2: float = 1e-3, tol: float = 3e-2, standardize: bool = True,
                 batch_size: int | None = None, seed: int = 0, dtype: str = "float64", device: str = "cpu",
                 config: DeltaGradConfig | dict | None = None, cache: str | None = None) -> None:
        self.model = model
        self.hidden = hidden
        self.optimizer = optimizer
        self.steps = steps
        self.lr = lr
        self.milestones = milestones
        self.gamma = gamma
        self.l2 = l2
        self.tol = tol
        self.standardize = standardize
        self.batch_size = batch_size
        self.seed = seed
        self.dtype = dtype
        self.device = device
        self.config = config
        self.cache = cache

    # -- settings, checked at fit time (scikit-learn: never in __init__) -----------------------
    def _check_params(self) -> None:
        if self.model not in self._kinds:
            raise InputError(f"model must be one of {', '.join(self._kinds)}, got {self.model!r}")
        if self.optimizer not in ("gd", "sgd"):
            raise InputError(f"optimizer must be gd or sgd, got {self.optimizer!r}")
        if self.optimizer == "sgd" and not self.batch_size:
            raise InputError("optimizer sgd needs a batch_size (e.g. 256)")
        if self.optimizer == "gd" and self.batch_size:
            raise InputError(f"batch_size applies to optimizer sgd only, got batch_size={self.batch_size!r} with gd")
        if self.batch_size is not None and (not isinstance(self.batch_size, numbers.Integral) or self.batch_size < 1):
            raise InputError(f"batch_size must be an integer >= 1 or None, got {self.batch_size!r}")
        if self.steps != "auto" and (isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral)
                                     or self.steps < 1):
            raise InputError(f"steps must be an integer >= 1 or 'auto', got {self.steps!r}")
        if not isinstance(self.l2, numbers.Real) or not self.l2 >= 0:
            raise InputError(f"l2 must be a number >= 0, got {self.l2!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real) or not 0 < self.tol < math.inf:
            raise InputError(f"tol must be a number > 0, got {self.tol!r}")
        if not isinstance(self.standardize, (bool, np.bool_)):
            raise InputError(f"standardize must be True or False, got {self.standardize!r}")
        if not isinstance(self.seed, numbers.Integral):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise InputError(f"dtype must be float64 or float32, got {self.dtype!r}")
        if self.model == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise InputError(f"hidden must be layer sizes >= 1 for the mlp, e.g. (100,), got {self.hidden!r}")

    def _learning_rate(self, fm: FunctionalModel, data: Dataset, n_classes: int | None) -> float:
        """``lr``, or for ``"auto"``: 1/L for the linear kinds, 0.5/|λ|max(∇²F(θ_0)) for the MLP.

        Linear kinds: L = c·σ_max([X, 1])²/n + λ, c = 1 for squared loss, ½ for softmax cross-entropy
        (its Hessian in the logits is at most ½I); σ_max² by :func:`~deltagrad_ray.core.spectral.gram_norm`.
        L bounds the Hessian everywhere, so η = 1/L (inside GD's stable range η < 2/L) converges
        without tuning. MLP: the curvature at the start (:func:`~deltagrad_ray.core.spectral.hessian_norm`)
        over at most :data:`CURVATURE_ROWS` evenly spaced rows; half its inverse leaves room for the
        curvature to grow during training (a heuristic: the MLP's objective has no global bound).
        """
        if isinstance(self.lr, str):
            if self.lr != "auto":
                raise InputError(f"lr must be a number > 0 or 'auto', got {self.lr!r}")
            X = data.X
            if self.model == "mlp":
                rows = torch.linspace(0, len(data) - 1, min(len(data), CURVATURE_ROWS)).round().long()
                rows = rows.to(X.device)
                theta0 = fm.init_params(int(self.seed), dtype=X.dtype, device=X.device)
                lam = hessian_norm(fm, theta0, X[rows], data.y[rows], float(self.l2))
                return MLP_LR_FACTOR / lam if lam > 0 and math.isfinite(lam) else 0.1
            Xd = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype, device=X.device)], dim=1)
            L = (1.0 if n_classes is None else 0.5) * gram_norm(Xd) / len(X) + float(self.l2)
            return 1.0 / L if L > 0 else 0.1
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real) or not (self.lr > 0 and
                                                                                    math.isfinite(self.lr)):
            raise InputError(f"lr must be a number > 0 or 'auto', got {self.lr!r}")
        return float(self.lr)

    def _deltagrad_config(self) -> DeltaGradConfig:
        if self.config is None:
            return DeltaGradConfig()
        if isinstance(self.config, DeltaGradConfig):
            return self.config
        if isinstance(self.config, dict):
            return DeltaGradConfig.from_dict(self.config)
        raise InputError(f"config must be a DeltaGradConfig, a dict of its fields or None, got {self.config!r}")

    def _build(self, d: int, c: int | None) -> FunctionalModel:
        hidden = tuple(int(h) for h in self.hidden) if self.model == "mlp" else ()
        if self._task == "regression" and self.model == "mlp":
            return _mlp_regression(d, hidden, int(self.seed))
        return ModelSpec(self.model, d, 1 if c is None else c, hidden).build()

    @property
    def _fm(self) -> FunctionalModel:
        """The functional model, built on first use (an unpickled estimator rebuilds it lazily)."""
        fm = self.__dict__.get("_model")
        if fm is None:
            fm = self._build(self.n_features_in_, self._n_classes())
            self.__dict__["_model"] = fm
        return fm

    # -- data ---------------------------------------------------------------------------------
    def _fit_arrays(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        if is_table(X):
            rows = read_rows(X, y, labels=True, what="X")
            X, y = rows.X, rows.y
        if y is not None and not isinstance(y, (str, bytes)):
            ya = np.asarray(y)
            if ya.dtype.kind == "f" and ya.ndim >= 1 and not np.isfinite(ya).all():
                i = int(np.flatnonzero(~np.isfinite(ya.reshape(len(ya), -1)).all(axis=1))[0])
                raise InputError(f"Input y contains {'NaN' if np.isnan(ya.reshape(len(ya), -1)[i]).any() else 'inf'} "
                                 f"in row {i}")
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], ensure_all_finite=False,
                             y_numeric=self._task == "regression")
        check_finite(X, "X", _names(self))
        return X, y

    def _scaled(self, X: np.ndarray) -> np.ndarray:
        """Rows in the units the model was trained in: (X − x_mean_) / x_scale_."""
        return (np.asarray(X, dtype=np.float64) - self.x_mean_) / self.x_scale_

    def _predict_tensor(self, X: Any) -> Tensor:
        """The rows of ``X``, validated and standardised as the training rows were, as a tensor."""
        check_is_fitted(self, "params_")
        if is_table(X):
            X = read_rows(X, labels=False, what="X").X
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32], ensure_all_finite=False)
        check_finite(X, "X", _names(self))
        return torch.as_tensor(np.ascontiguousarray(self._scaled(X)), dtype=self.params_.dtype,
                               device=self.params_.device)

    # -- fit ------------------------------------------------------------------------------------
    def _fit(self, X: np.ndarray, labels: np.ndarray, n_classes: int | None):
        self._check_params()
        config = self._deltagrad_config()
        dt = DTYPES[self.dtype]
        for name in ("trajectory_", "cache_", "params_", "_data", "_model", "forget_report_", "_unpickled"):
            self.__dict__.pop(name, None)
        X = np.ascontiguousarray(X, dtype=np.float64)  # one memory order: the same sums for arrays and DataFrames
        d = X.shape[1]
        self.x_mean_, self.x_scale_ = _standardization(X) if self.standardize else (np.zeros(d), np.ones(d))
        if n_classes is None:
            y = labels.astype(np.float64)
            m, s = _standardization(y[:, None]) if self.standardize else (np.zeros(1), np.ones(1))
            self.y_mean_, self.y_scale_ = float(m[0]), float(s[0])
            y = torch.from_numpy((y - self.y_mean_) / self.y_scale_)
        else:
            y = torch.from_numpy(labels.astype(np.int64))
        data = Dataset(torch.from_numpy(np.ascontiguousarray(self._scaled(X))), y,
                       torch.arange(len(X), dtype=torch.int64))
        fm = self._build(d, n_classes)
        batch = self.batch_size if self.optimizer == "sgd" else None
        work = data.to(dtype=dt, device=self.device)
        lr = self._learning_rate(fm, work, n_classes)
        l2 = float(self.l2)
        traj = None
        if self.steps != "auto":
            steps = int(self.steps)
        elif batch is not None:
            steps = AUTO_SGD_EPOCHS * math.ceil(len(data) / int(batch))
        else:  # in memory, the run that finds T is the recorded one; for a cache, a first run finds T
            cap = learning_rates(AUTO_MAX_STEPS, lr, tuple(self.milestones), float(self.gamma))
            steps, traj = _gd_to_tolerance(fm, work, cap, l2, int(self.seed), float(self.tol), self.cache is None)
        if self.cache is None:
            if traj is None:
                lrs = learning_rates(steps, lr, tuple(self.milestones), float(self.gamma))
                traj = train(fm, work, steps=steps, lrs=lrs, l2=l2, batch_size=batch, seed=int(self.seed))
            self.trajectory_ = traj
            self._data = work
            params, initial = traj.final, traj.initial
        else:
            if fm.spec is None:
                raise InputError(f"cache= records the built-in models (logreg, mlp classification, linear); "
                                 f"{self.model} regression trains in memory only (cache=None)")
            from .. import api
            c = api.fit(data, self.cache, model=self.model, hidden=fm.spec.hidden, optimizer=self.optimizer,
                        steps=steps, lr=lr, milestones=tuple(self.milestones),
                        gamma=float(self.gamma), batch_size=batch, l2=l2, seed=int(self.seed),
                        dtype=self.dtype, n_classes=n_classes, device=self.device)
            self.cache_ = c.uri
            params = c.final.to(device=self.device)
            initial = fm.init_params(int(self.seed), dtype=params.dtype, device=params.device)
        if not bool(torch.isfinite(params).all()):
            raise InputError(f"training diverged (NaN or inf parameters after {steps} steps at lr={lr:g}); "
                             "lower lr, or scale the features and targets")
        self.__dict__["_model"] = fm
        self._config_ = config
        self.lr_ = lr
        self.n_iter_ = steps
        self._set_params(params)
        self._check_convergence(fm, work, initial, params, l2, steps, lr)
        return self

    def _check_convergence(self, fm: FunctionalModel, data: Dataset, initial: Tensor, final: Tensor, l2: float,
                           steps: int, lr: float) -> None:
        """Sets ``gradient_ratio_`` = ‖∇F(θ_T)‖ / ‖∇F(θ_0)‖ and warns when it is above ``tol``."""
        g0 = float(_full_gradient(fm, initial, data, l2).norm())
        gT = float(_full_gradient(fm, final, data, l2).norm())
        self.gradient_ratio_ = gT / g0 if g0 > 0 else 0.0
        if self.gradient_ratio_ > float(self.tol):
            if self.steps == "auto" and self.optimizer == "gd":
                change = (f"steps='auto' stops at {AUTO_MAX_STEPS}: give more steps (an integer), or a larger lr "
                          f"(η was {lr:.3g})")
            else:
                change = (f"raise steps (or steps='auto' with optimizer='gd'), or change lr (η was {lr:.3g}: smaller "
                          "if the objective oscillates, larger if it creeps)")
            if not self.standardize:
                change += "; or standardize=True (features and targets in units far from 1 slow gradient descent)"
            warnings.warn(f"{type(self).__name__} ended far from a stationary point after {steps} steps: "
                          f"‖∇F(θ_T)‖ = {self.gradient_ratio_:.3g}·‖∇F(θ_0)‖ > tol = {float(self.tol):g}; {change}",
                          ConvergenceWarning, stacklevel=4)

    def _set_params(self, params: Tensor) -> None:
        self.params_ = params
        spec = self._fm.spec
        if spec is not None and spec.kind in ("logreg", "linear"):
            # θ acts on standardised rows z = (x − μ)/σ; in the original units: W/σ and b − W·(μ/σ)
            W, b = (v.double().numpy() for v in self._fm.unflatten(params.detach().cpu()).values())
            W = W / self.x_scale_
            b = b - W @ self.x_mean_
            if spec.kind == "logreg":
                self.coef_, self.intercept_ = W.copy(), b.copy()
            else:
                self.coef_ = W.reshape(-1) * self.y_scale_
                self.intercept_ = float(b[0] * self.y_scale_ + self.y_mean_)

    # -- pickling: what predict needs; the trajectory stays behind -------------------------------
    def __getstate__(self) -> dict:
        """The state without the in-memory trajectory, the training rows or the functional model.

        Pickles (joblib, MAPIE's ``n_jobs``, Ray) carry the parameters, the scaling and the fitted
        attributes; an unpickled estimator predicts, and forgets only when fitted with ``cache=``.
        """
        state = dict(super().__getstate__())
        state.pop("_model", None)
        state.pop("_data", None)
        if state.get("trajectory_") is not None:
            state["trajectory_"] = None
            state["_unpickled"] = True
        return state

    def __copy__(self) -> _DeltaGradBase:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> _DeltaGradBase:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "_model"}, memo))
        return new

    def _n_classes(self) -> int | None:
        return None

    # -- evaluation -----------------------------------------------------------------------------
    def _outputs(self, thetas: Tensor, X: Tensor) -> Tensor:
        """Outputs of B models on m standardised rows: (B, m, c) logits, or (B, m) predictions in y's units."""
        with torch.no_grad():
            out = vmap(self._fm.forward, in_dims=(0, None))(thetas, X)
        if self._task == "regression":
            return out.reshape(thetas.shape[0], X.shape[0]) * self.y_scale_ + self.y_mean_
        return out

    # -- unlearning -----------------------------------------------------------------------------
    def _recording(self) -> _Recording:
        """The recorded training the unlearning verbs replay: the trajectory in memory, or the cache
        at ``cache_``; an error saying why when this estimator holds neither."""
        check_is_fitted(self, "params_")
        traj = self.__dict__.get("trajectory_")
        if traj is not None:
            return _MemoryRecording(self, traj, self._data)
        if self.__dict__.get("cache_") is None:
            raise InputError(_UNPICKLED if self.__dict__.get("_unpickled") else _NO_TRAJECTORY)
        from ..store.cache import open_cache
        return _CachedRecording(self, open_cache(self.cache_))

    @staticmethod
    def _rows(indices: Any, n: int, what: str = "indices") -> Tensor:
        """``indices`` checked as row numbers of n training rows, as a tensor."""
        arr = np.asarray(indices)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1 or (len(arr) and arr.dtype.kind not in "iu"):
            raise InputError(f"{what} must be a list of row numbers of the training data, got {indices!r}")
        bad = np.flatnonzero((arr < 0) | (arr >= n))
        if len(bad):
            raise InputError(f"{what}: row {int(arr[bad[0]])} is out of range; the training data has {n} rows "
                             f"(0 … {n - 1})")
        if len(arr) == 0:
            raise InputError(f"{what}: no rows given")
        return torch.as_tensor(arr.astype(np.int64))

    def _copy_with(self, params: Tensor, **fitted) -> _DeltaGradBase:
        new = copy.copy(self)
        new.__dict__.update({"trajectory_": None, "cache_": None, **fitted})
        new._set_params(params)
        return new

    def forget(self, indices: Any, *, exact: bool = False, out_cache: str | None = None) -> _DeltaGradBase:
        """A fitted copy of this estimator trained without the training rows ``indices``.

        Args:
          indices: row numbers of the data given to :meth:`fit` (0 … n−1).
          exact: retrain exactly (same θ_0, learning rates, batch order and scaling) instead of DeltaGrad.
          out_cache: (estimators fitted with ``cache=``) where to write the replayed trajectory as a new
            cache, so that the copy can forget again; without it the copy predicts but cannot forget.

        Returns:
          A new estimator (this one is unchanged) with ``forget_report_``: the replay's counters
          (explicit and approximate steps, fallbacks, L-BFGS prediction error).

        Example:
          >>> from sklearn.datasets import load_breast_cancer
          >>> X, y = load_breast_cancer(return_X_y=True)
          >>> clf = DeltaGradClassifier().fit(X, y)
          >>> without = clf.forget([3, 14, 15])            # DeltaGrad
          >>> exact = clf.forget([3, 14, 15], exact=True)  # the ground truth
          >>> moved = np.abs(exact.predict_proba(X) - clf.predict_proba(X)).max()   # the deletion's effect
          >>> bool(np.abs(without.predict_proba(X) - exact.predict_proba(X)).max() < 0.05 * moved)
          True
        """
        recording = self._recording()
        params, fitted = recording.forget(self._rows(indices, recording.n_rows), exact, out_cache)
        return self._copy_with(params, **fitted)

    def forget_many(self, index_sets: Sequence[Any], *, exact: bool = False, backend: Any = None,
                    batch_size: int = 32, verify: int | None = None, random_state: int = 0) -> Forgotten:
        """One fitted copy per set of training rows, each trained without that set.

        The requests are replayed together (``batch_size`` per pass over the trajectory), in this
        process or on Ray. The copies predict; they hold no trajectory, so they cannot forget again
        (use :meth:`forget` for that).

        Args:
          index_sets: a list of lists of row numbers (0 … n−1 of the data given to :meth:`fit`).
          exact: retrain each exactly instead.
          backend: ``None`` or ``"serial"`` (this process), ``"ray"`` (a :class:`RayBackend` on the
            connected Ray cluster), or a backend object from ``deltagrad_ray.distributed.backends``.
            Ray needs an estimator fitted with ``cache=`` (its actors load the trajectory from there).
          batch_size: requests replayed together (B).
          verify: K, to also retrain K of the sets drawn at random (seeded by ``random_state``) exactly:
            the result's ``verification`` then states, with probability >= 95% over the draw, a bound
            on the error ‖θ_DeltaGrad − θ_exact‖ / ‖θ_exact − θ_full‖ of 95% of ALL the copies
            (K >= 59 for a bound; README, Verification).

        Returns:
          A list of estimators, in the order of ``index_sets`` (a :class:`Forgotten`: with ``verify``,
          its ``verification`` holds the statement; None otherwise).
        """
        if verify is not None:
            check_settings(verify, VERIFY_QUANTILE, VERIFY_CONFIDENCE)  # before any replay
        changes = self._change_sets(index_sets)
        params = self._replay_many(changes, exact=exact, backend=backend, batch_size=batch_size)
        out = Forgotten(self._copy_with(params[b], forget_report_={"method": "exact" if exact else "deltagrad"})
                        for b in range(params.shape[0]))
        if verify is not None:
            out.verification = self._verified(changes, params, verify, random_state, backend, batch_size)
        return out

    def _verified(self, changes: list[ChangeSet], params: Tensor, k: int, seed: int, backend: Any,
                  batch_size: int) -> Verification:
        """K of the replayed ``changes`` (their models ``params``) drawn at random with ``seed`` and
        retrained exactly: the order-statistic statement about all of them, a bound on
        :data:`VERIFY_QUANTILE` of them at :data:`VERIFY_CONFIDENCE` (:mod:`deltagrad_ray.stats.verification`)."""
        idx = draw(len(changes), min(int(k), len(changes)), int(seed))
        truth = self._replay_many([changes[i] for i in idx.tolist()], exact=True, backend=backend,
                                  batch_size=batch_size)
        return verification(params[idx].to(truth.dtype), truth, self.params_.to(truth.dtype), idx, len(changes),
                            quantile=VERIFY_QUANTILE, confidence=VERIFY_CONFIDENCE)

    def _change_sets(self, index_sets: Sequence[Any]) -> list[ChangeSet]:
        if isinstance(index_sets, (str, bytes)) or not hasattr(index_sets, "__len__") or len(index_sets) == 0:
            raise InputError(f"index_sets must be a non-empty list of lists of row numbers, got {index_sets!r}")
        n = self._recording().n_rows
        return [ChangeSet(self._rows(s, n, what=f"index set {j}")) for j, s in enumerate(index_sets)]

    def _replay_many(self, changes: list[ChangeSet], *, exact: bool = False, backend: Any = None,
                     batch_size: int = 32) -> Tensor:
        """(B, p) parameters after each change set (DeltaGrad, batched; or exact retraining)."""
        if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        return self._recording().replay_many(changes, exact, backend, int(batch_size))

    def _training_data(self) -> Dataset:
        """The rows the trajectory was trained on: standardised features, class indices or standardised targets."""
        return self._recording().training_data()

    def _training_labels(self) -> np.ndarray:
        """The labels given to fit, in their own units (class labels, or float targets)."""
        y = self._training_data().y.cpu().numpy()
        if self._task == "classification":
            return self.classes_[y]
        return y.astype(np.float64) * self.y_scale_ + self.y_mean_

    def _active_rows(self) -> Tensor:
        return self._recording().active_rows()

    def _loo_outputs(self, X: Any, chunk: int, exact: bool, backend: Any, batch_size: int):
        """Yield (rows, outputs) for chunks of leave-one-out models: (k,) rows and (k, m[, c]) outputs."""
        if not isinstance(chunk, numbers.Integral) or chunk < 1:
            raise InputError(f"chunk must be an integer >= 1, got {chunk!r}")
        Xt = self._predict_tensor(X)
        rows = self._active_rows()
        if len(rows) < 2:
            raise InputError("leave-one-out needs at least 2 training rows")
        for a in range(0, len(rows), int(chunk)):
            part = rows[a:a + int(chunk)]
            changes = [ChangeSet(part[i:i + 1]) for i in range(len(part))]
            thetas = self._replay_many(changes, exact=exact, backend=backend, batch_size=batch_size)
            yield part, self._outputs(thetas, Xt)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False       # seeded: the same data and seed give the same model
        tags.input_tags.allow_nan = False    # NaN or inf in X is an error naming the row and column
        tags.input_tags.sparse = False       # dense features only
        tags.target_tags.required = True
        return tags


def _names(est) -> list[str] | None:
    names = getattr(est, "feature_names_in_", None)
    return None if names is None else [str(n) for n in names]


class DeltaGradClassifier(ClassifierMixin, _DeltaGradBase):
    """Multinomial logistic regression or a ReLU MLP, trained by recorded GD/SGD, able to forget rows.

    The defaults fit scikit-learn's bundled data sets as given, unscaled: the features are
    standardised inside, η and T are chosen from the data, and a fit that ends far from a stationary
    point warns.

    Args:
      model: ``"logreg"`` (softmax regression) or ``"mlp"`` (ReLU network with ``hidden`` sizes).
      hidden: hidden layer sizes of the MLP.
      optimizer: ``"gd"`` (full batch) or ``"sgd"`` (mini-batches of ``batch_size``).
      steps: T, the number of steps; ``"auto"`` (default): with ``gd``, the first t at which
        ‖∇F(θ_t)‖ ≤ ``tol``·‖∇F(θ_0)‖, at most 1000 (in memory the run that finds T is the one
        recorded; with ``cache=`` a first, unrecorded run finds T); with ``sgd``, 10 passes over the rows.
      lr, milestones, gamma: learning rate η, multiplied by ``gamma`` at each milestone step;
        ``"auto"`` (default): η = 1/L for the smoothness bound L of the linear model's objective on the
        (standardised) training rows, stable for gradient descent; for the MLP, 0.5/|λ|max of the
        Hessian of the objective at θ_0 (its curvature at the start, by Hessian-vector products on at
        most 4096 rows; a heuristic, the MLP's curvature changes as it trains). The fitted ``lr_``
        holds the value. A number is used as given, on the standardised problem.
      l2: λ of the objective mean loss + (λ/2)‖θ‖², over the standardised rows (all parameters,
        biases included); comparable to scikit-learn's ``LogisticRegression(C=1/(n·λ))`` and
        ``MLPClassifier(alpha=n·λ)`` on standardised features.
      tol: the fit counts as converged when ‖∇F(θ_T)‖ ≤ tol·‖∇F(θ_0)‖ (F the objective over all training
        rows, θ_0 the start): ``steps="auto"`` stops there, and a fit that ends above it warns with a
        :class:`~sklearn.exceptions.ConvergenceWarning` naming ``steps`` and ``lr``. The fitted
        ``gradient_ratio_`` holds the ratio.
      standardize: train on (x − mean)/std of the training rows (True, default; the means and
        standard deviations are fixed at fit time, kept as ``x_mean_`` and ``x_scale_``, and applied
        to the rows given to ``predict``); False trains on the features as given.
      batch_size: mini-batch size (``sgd`` only).
      seed: initialisation (MLP) and batch order.
      dtype: ``"float64"`` or ``"float32"``.
      device: torch device, e.g. ``"cuda:0"``.
      config: DeltaGrad settings (T0, j0, m, schedule, …): a :class:`~deltagrad_ray.DeltaGradConfig`,
        a dict of its fields, or None for the defaults (T0 = 5, j0 = 10, m = 2).
      cache: optional location (path, ``file://``, ``s3://``) where ``fit`` records the trajectory as a
        cache through the storage API (a new location per fit); default: in memory.

    Forgetting keeps the scaling: ``forget`` and exact retraining (``exact=True``) train on the
    remaining rows standardised with the means and standard deviations of all the rows given to
    ``fit`` (as a ``Pipeline`` whose ``StandardScaler`` was fitted once would), with the same θ_0, η
    and T; a new ``fit`` on the remaining rows would rescale them and may choose another η and T.

    Pickling (joblib, MAPIE's ``n_jobs``, Ray) carries what ``predict`` needs — parameters, scaling,
    fitted attributes — and not the in-memory trajectory or training rows; an unpickled estimator
    predicts, and ``forget`` on it raises an error saying to fit with ``cache=`` (whose trajectory
    stays on storage and is reloaded). ``copy.deepcopy`` keeps everything.

    Fitted attributes: ``classes_`` (labels of any type, sorted), ``n_features_in_``,
    ``feature_names_in_`` (DataFrames), ``x_mean_`` and ``x_scale_`` (d,), ``params_`` (θ_T, a tensor,
    acting on standardised rows), ``coef_`` (c, d) and ``intercept_`` (c,) (logreg; in the units of
    the features given), ``trajectory_`` (in memory) or ``cache_`` (its location), ``lr_``, ``n_iter_``
    (T), ``gradient_ratio_``.

    Example:
      >>> from sklearn.datasets import load_wine
      >>> X, y = load_wine(return_X_y=True)                 # unscaled: standardised inside
      >>> clf = DeltaGradClassifier().fit(X, y)
      >>> clf.score(X, y) > 0.95
      True
      >>> loo = clf.loo_predict(X[:5])     # (178, 5): each leave-one-out model's labels
    """

    _kinds = ("logreg", "mlp")
    _task = "classification"

    def __init__(self, model: str = "logreg", *, hidden: Sequence[int] = (100,), optimizer: str = "gd",
                 steps: int | str = "auto", lr: float | str = "auto", milestones: Sequence[int] = (),
                 gamma: float = 0.1, l2: float = 1e-3, tol: float = 3e-2, standardize: bool = True,
                 batch_size: int | None = None, seed: int = 0, dtype: str = "float64", device: str = "cpu",
                 config: DeltaGradConfig | dict | None = None, cache: str | None = None) -> None:
        super().__init__(model, hidden=hidden, optimizer=optimizer, steps=steps, lr=lr, milestones=milestones,
                         gamma=gamma, l2=l2, tol=tol, standardize=standardize, batch_size=batch_size, seed=seed,
                         dtype=dtype, device=device, config=config, cache=cache)

    def fit(self, X: Any, y: Any = None) -> DeltaGradClassifier:
        """Train on ``X`` (n, d) and labels ``y`` (any type), recording the trajectory.

        Args:
          X: array-like or DataFrame (every column a feature); or a pyarrow Table, Parquet location or
            ``ray.data.Dataset`` in the project's layout (``label`` column unless ``y`` is given).
          y: labels, one per row.

        Returns:
          self.
        """
        X, y = self._fit_arrays(X, y)
        check_classification_targets(y)
        self.classes_, labels = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise InputError(f"the classifier needs samples of at least 2 classes; the data holds one class: "
                             f"{self.classes_[0]!r}")
        return self._fit(X, labels.reshape(-1), len(self.classes_))

    def _n_classes(self) -> int | None:
        return len(self.classes_)

    def _proba(self, thetas: Tensor, X: Tensor) -> Tensor:
        return torch.softmax(self._outputs(thetas, X), dim=-1)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, (m, c), columns in the order of ``classes_``."""
        Xt = self._predict_tensor(X)
        return self._proba(self.params_[None], Xt)[0].cpu().double().numpy()

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Log class probabilities, (m, c)."""
        Xt = self._predict_tensor(X)
        return torch.log_softmax(self._outputs(self.params_[None], Xt)[0], dim=-1).cpu().double().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Labels (from ``classes_``) of the rows of ``X``."""
        Xt = self._predict_tensor(X)
        return self.classes_[self._outputs(self.params_[None], Xt)[0].argmax(-1).cpu().numpy()]

    def loo_predict(self, X: Any, *, proba: bool = False, chunk: int = 256, exact: bool = False,
                    backend: Any = None, batch_size: int = 32) -> np.ndarray:
        """Every leave-one-out model's predictions for the rows of ``X``.

        Row i of the result comes from the model trained without training row i (of the rows still
        in the model). Models are replayed ``chunk`` at a time (DeltaGrad, ``batch_size`` per pass),
        evaluated and dropped: memory holds ``chunk`` parameter vectors and their (chunk, m, c)
        probabilities, plus the result, n × m labels (``proba=True``: n × m × c floats) — never the
        n models at once.

        Args:
          X: rows to predict (m of them).
          proba: return probabilities (n, m, c) instead of labels (n, m).
          chunk: leave-one-out models held at once.
          exact: exact retraining for every model instead of DeltaGrad.
          backend, batch_size: as in :meth:`forget_many`.

        Returns:
          (n, m) labels, or (n, m, c) probabilities; n = training rows.
        """
        out = None
        for rows, logits in self._loo_outputs(X, chunk, exact, backend, batch_size):
            p = torch.softmax(logits, dim=-1)
            if out is None:
                keep = self._active_rows().numpy()
                out = (np.empty((len(keep), p.shape[1], p.shape[2])) if proba
                       else np.empty((len(keep), p.shape[1]), dtype=self.classes_.dtype))
            idx = np.searchsorted(keep, rows.numpy())
            out[idx] = p.cpu().double().numpy() if proba else self.classes_[p.argmax(-1).cpu().numpy()]
        return out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        tags.classifier_tags.multi_label = False
        tags.classifier_tags.poor_score = False
        return tags


class DeltaGradRegressor(RegressorMixin, _DeltaGradBase):
    """Least squares or a ReLU MLP regressor, trained by recorded GD/SGD, able to forget rows.

    Args: as :class:`DeltaGradClassifier`, with ``model`` ``"linear"`` (½(xᵀw + b − y)², the
    default) or ``"mlp"`` (a ReLU network with one output and squared loss; in memory only). With
    ``standardize=True`` (default) the targets are standardised too (``y_mean_``, ``y_scale_``, fixed
    at fit time like the features' scaling): predictions come back in y's units, and the fit is the
    same for targets at any scale. ``l2`` is then comparable to ``Ridge(alpha=n·λ)`` and
    ``MLPRegressor(alpha=n·λ)`` on standardised features and targets.

    Fitted attributes: ``n_features_in_``, ``feature_names_in_`` (DataFrames), ``x_mean_``, ``x_scale_``,
    ``y_mean_``, ``y_scale_``, ``params_`` (on the standardised problem), ``coef_`` (d,) and
    ``intercept_`` (linear; in the units of X and y), ``trajectory_`` or ``cache_``, ``lr_``, ``n_iter_``,
    ``gradient_ratio_``.

    Example:
      >>> from sklearn.datasets import load_diabetes
      >>> X, y = load_diabetes(return_X_y=True)
      >>> reg = DeltaGradRegressor().fit(X, y)
      >>> reg.score(X, y) > 0.5
      True
      >>> bool(np.allclose(X @ reg.coef_ + reg.intercept_, reg.predict(X)))
      True
    """

    _kinds = ("linear", "mlp")
    _task = "regression"

    def __init__(self, model: str = "linear", *, hidden: Sequence[int] = (100,), optimizer: str = "gd",
                 steps: int | str = "auto", lr: float | str = "auto", milestones: Sequence[int] = (),
                 gamma: float = 0.1, l2: float = 1e-3, tol: float = 3e-2, standardize: bool = True,
                 batch_size: int | None = None, seed: int = 0, dtype: str = "float64", device: str = "cpu",
                 config: DeltaGradConfig | dict | None = None, cache: str | None = None) -> None:
        super().__init__(model, hidden=hidden, optimizer=optimizer, steps=steps, lr=lr, milestones=milestones,
                         gamma=gamma, l2=l2, tol=tol, standardize=standardize, batch_size=batch_size, seed=seed,
                         dtype=dtype, device=device, config=config, cache=cache)

    def fit(self, X: Any, y: Any = None) -> DeltaGradRegressor:
        """Train on ``X`` (n, d) and float targets ``y``, recording the trajectory.

        Args:
          X: as :meth:`DeltaGradClassifier.fit`.
          y: targets, one float per row.

        Returns:
          self.
        """
        X, y = self._fit_arrays(X, y)
        return self._fit(X, np.asarray(y, dtype=np.float64).reshape(-1), None)

    def predict(self, X: Any) -> np.ndarray:
        """Predictions (m,) for the rows of ``X``."""
        Xt = self._predict_tensor(X)
        return self._outputs(self.params_[None], Xt)[0].cpu().double().numpy()

    def loo_predict(self, X: Any, *, chunk: int = 256, exact: bool = False, backend: Any = None,
                    batch_size: int = 32) -> np.ndarray:
        """Every leave-one-out model's predictions for the rows of ``X``: (n, m), row i from the model
        trained without training row i.

        Models are replayed ``chunk`` at a time and dropped after use: memory holds ``chunk``
        parameter vectors and their (chunk, m) predictions, plus the n × m result.

        Args:
          X: rows to predict (m of them).
          chunk: leave-one-out models held at once.
          exact: exact retraining for every model instead of DeltaGrad.
          backend, batch_size: as in :meth:`forget_many`.

        Returns:
          (n, m) predictions; n = training rows.
        """
        out = None
        for rows, pred in self._loo_outputs(X, chunk, exact, backend, batch_size):
            if out is None:
                keep = self._active_rows().numpy()
                out = np.empty((len(keep), pred.shape[1]))
            out[np.searchsorted(keep, rows.numpy())] = pred.cpu().double().numpy()
        return out
