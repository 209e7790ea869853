"""The statistics of many models in bounded memory: jackknife, test losses, jackknife+/CV+ intervals and sets.

The same statistics as :mod:`.jackknife` and :mod:`.conformal` — the dense reference functions,
which take every model's predictions on every test point as one tensor — computed by streaming
over chunks of models (a :class:`~.tables.ModelTable`) and chunks of test points. The memory held
is O(chunk), set by a budget (``memory_mb``), whatever the number of test points: the n models ×
m test points are never materialised. Results equal the dense ones to round-off (tested).

What each statistic needs:

* jackknife: per test point, the mean and the sum of squared deviations of the n models'
  predictions, merged chunk by chunk (Chan, Golub & LeVeque 1983); the models are read once;
* test losses (and influence): per model, its loss summed over the test chunks;
* conformal sets (Romano, Sesia & Candès 2020, jackknife+/CV+ style): per test point and label
  the count #{i : s(x, y; μ̂_(i)) > R_i}, summed over model chunks;
* jackknife+/CV+ intervals (Barber et al. 2021): exact order statistics, the k-th smallest of n
  values per test point, from an (n × test-chunk) buffer filled model chunk by model chunk (the
  models are read once per test chunk, or once in all when they fit a quarter of the budget).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from ..core.errors import InputError
from ..core.models import FunctionalModel
from .conformal import _kth, check_alpha
from .jackknife import Jackknife, from_moments, jackknife
from .tables import ModelTable, TensorTable, as_table

DEFAULT_MEMORY_MB = 256.0


class Chunks(NamedTuple):
    """Block sizes of a streamed statistic.

    Fields:
      models: models evaluated together (and calibration rows compared together)
      tests:  test points evaluated together
    """

    models: int
    tests: int


class Calibration(NamedTuple):
    """The calibration points of jackknife+/CV+ and the model that left each one out.

    Fields:
      X:        (N, d) rows holding the calibration points (e.g. the whole training set)
      y:        (N,) their targets (regression) or class indices
      rows:     (n,) the calibration points' rows in X
      model_of: (n,) the index, in the model table, of the model fitted without each point:
                its own (jackknife+) or its fold's (CV+)
    """

    X: Tensor
    y: Tensor
    rows: Tensor
    model_of: Tensor


def check_memory_mb(memory_mb: float) -> float:
    """A working-memory budget in MiB: a finite number > 0."""
    _budget(memory_mb)
    return float(memory_mb)


def _budget(memory_mb: float) -> int:
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, (int, float)) or not (
            math.isfinite(memory_mb) and memory_mb > 0):
        raise InputError(f"memory_mb must be a number > 0, got {memory_mb!r}")
    return int(memory_mb * 2 ** 20)


def _width(model: FunctionalModel) -> int:
    """Floats a forward pass holds per (model, row): the outputs, and an MLP's hidden activations."""
    hidden = sum(model.spec.hidden) if model.spec is not None else 0
    return (model.n_classes or 1) + hidden


def plan_chunks(model: FunctionalModel, n_models: int, n_tests: int, *, memory_mb: float = DEFAULT_MEMORY_MB,
                quantile_rows: int = 0, dtype: torch.dtype = torch.float64) -> Chunks:
    """Chunk sizes that keep a streamed statistic's working memory near ``memory_mb``.

    Half the budget goes to the blocks of models × test points (their parameters, a cast copy,
    the outputs, probabilities, scores and comparisons), half to the order-statistic buffers of
    the intervals: ``quantile_rows`` × test-chunk values, their ±R copy, and torch.kthvalue's
    copy and int64 indices.

    Args:
      model: the models' architecture (sets the floats per model and row).
      n_models, n_tests: how many models and test points there are (chunks never exceed them).
      memory_mb: the budget, in MiB.
      quantile_rows: rows of the order-statistic buffer (the calibration points), 0 for none.
      dtype: the precision of the computation.

    Returns:
      :class:`Chunks` with both sizes >= 1.
    """
    budget, e = _budget(memory_mb), torch.empty((), dtype=dtype).element_size()
    tests = budget // 2 // (quantile_rows * (3 * e + 8)) if quantile_rows else 1024
    tests = max(1, min(n_tests, tests))
    cell = e * (4 * _width(model) + 2)
    models = (budget // 2) // (2 * model.p * e + tests * cell)
    return Chunks(max(1, min(n_models, models)), tests)


def _check_chunks(chunks: Chunks) -> Chunks:
    for name, v in zip(Chunks._fields, chunks):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"chunks.{name} must be an integer >= 1, got {v!r}")
    return Chunks(*chunks)


def _outputs(model: FunctionalModel, thetas: Tensor, X: Tensor) -> Tensor:
    """Raw outputs of k models on m rows: (k, m, o)."""
    return vmap(model.forward, in_dims=(0, None))(thetas, X)


def _to_pred(model: FunctionalModel, out: Tensor) -> Tensor:
    """Predictions (k, m) for regression, probabilities (k, m, c) for classification."""
    if model.task == "regression":
        return out.reshape(out.shape[0], -1)
    return torch.softmax(out, dim=-1)


def predict(model: FunctionalModel, thetas: Tensor, X: Tensor, *, chunk: int | None = None) -> Tensor:
    """Outputs of k models on m rows: (k, m) predictions (regression) or (k, m, c) probabilities.

    Args:
      model: the architecture.
      thetas: (k, p) parameters.
      X: (m, d) rows.
      chunk: evaluate this many rows at a time (default: all at once).
    """
    if chunk is None or chunk >= X.shape[0]:
        return _to_pred(model, _outputs(model, thetas, X))
    return torch.cat([_to_pred(model, _outputs(model, thetas, X[j:j + chunk]))
                      for j in range(0, X.shape[0], chunk)], dim=1)


def own_rows(model: FunctionalModel, thetas: Tensor, X: Tensor) -> Tensor:
    """Model b evaluated on row b only: (k,) predictions or (k, c) probabilities."""
    out = vmap(lambda t, x: model.forward(t, x[None])[0])(thetas, X)
    return out.reshape(-1) if model.task == "regression" else torch.softmax(out, dim=-1)


def _losses(model: FunctionalModel, out: Tensor, y: Tensor) -> Tensor:
    """Summed loss over the rows of each of k models' outputs (k, m, o): (k,)."""
    return vmap(lambda o: model.loss(o, y).sum())(out)


def _prepare(model, models, X, memory_mb, chunks, quantile_rows=0) -> tuple[ModelTable, Chunks]:
    models = as_table(models)
    if models.p != model.p:
        raise InputError(f"models have {models.p} parameters, the model {model.p}")
    ch = _check_chunks(chunks) if chunks is not None else plan_chunks(
        model, len(models), X.shape[0], memory_mb=memory_mb, quantile_rows=quantile_rows, dtype=X.dtype)
    return models, ch


def streamed_test_loss(model: FunctionalModel, models: ModelTable | Tensor, X: Tensor, y: Tensor, *,
                       memory_mb: float = DEFAULT_MEMORY_MB, chunks: Chunks | None = None) -> Tensor:
    """Mean test loss of each model, accumulated over chunks of test points.

    Args:
      model: the architecture.
      models: n parameter vectors (a :class:`ModelTable` or an (n, p) tensor).
      X, y: (m, d) test features and (m,) labels.
      memory_mb: working-memory budget (see :func:`plan_chunks`); ``chunks`` overrides it.

    Returns:
      (n,) the mean loss over the m test points, per model.
    """
    models, ch = _prepare(model, models, X, memory_mb, chunks)
    total = torch.zeros(len(models), dtype=X.dtype)
    for s, th in models.chunks(ch.models):
        th = th.to(X.dtype)
        for j in range(0, X.shape[0], ch.tests):
            total[s:s + len(th)] += _losses(model, _outputs(model, th, X[j:j + ch.tests]), y[j:j + ch.tests])
    return total / X.shape[0]


def streamed_jackknife(model: FunctionalModel, full: Tensor, models: ModelTable | Tensor, X: Tensor, y: Tensor, *,
                       memory_mb: float = DEFAULT_MEMORY_MB, chunks: Chunks | None = None
                       ) -> tuple[Jackknife, Jackknife]:
    """Jackknife of the test predictions and of the mean test loss, the models read once.

    Equal to ``jackknife(predict(full), predict(models))`` and ``jackknife(loss(full), loss(models))``
    (:func:`~.jackknife.jackknife`) to round-off. The mean and sum of squared deviations of each
    test point's predictions are merged over model chunks by Chan, Golub & LeVeque's (1983)
    pairwise update, numerically sound where the one-pass sum of squares is not.

    Args:
      model: the architecture.
      full: (p,) the full-data model θ̂.
      models: the n leave-one-out models (a :class:`ModelTable` or an (n, p) tensor), n >= 2.
      X, y: (m, d) test features and (m,) labels.
      memory_mb: working-memory budget (see :func:`plan_chunks`); ``chunks`` overrides it.

    Returns:
      ``(predictions, test_loss)``: the :class:`~.jackknife.Jackknife` of the (m,) predictions
      (regression) or (m, c) probabilities, and of the scalar mean test loss.
    """
    models, ch = _prepare(model, models, X, memory_mb, chunks)
    n, m = len(models), X.shape[0]
    if n < 2:
        raise InputError(f"the jackknife needs at least 2 leave-one-out values, got {n}")
    theta = full.to(X.dtype)[None]
    full_pred = predict(model, theta, X, chunk=ch.tests)[0]
    full_loss = sum(_losses(model, _outputs(model, theta, X[j:j + ch.tests]), y[j:j + ch.tests])[0]
                    for j in range(0, m, ch.tests)) / m
    mean, m2 = torch.zeros_like(full_pred), torch.zeros_like(full_pred)
    total = torch.zeros(n, dtype=X.dtype)
    for s, th in models.chunks(ch.models):
        th, k = th.to(X.dtype), th.shape[0]
        for j in range(0, m, ch.tests):
            out = _outputs(model, th, X[j:j + ch.tests])
            total[s:s + k] += _losses(model, out, y[j:j + ch.tests])
            q = _to_pred(model, out)                                  # (k, t[, c])
            q_mean = q.mean(0)
            q_m2 = ((q - q_mean) ** 2).sum(0)
            # Chan et al. 1983: merge (s, mean, m2) with the chunk's (k, q_mean, q_m2)
            delta = q_mean - mean[j:j + ch.tests]
            mean[j:j + ch.tests] += delta * (k / (s + k))
            m2[j:j + ch.tests] += q_m2 + delta ** 2 * (s * k / (s + k))
    return from_moments(full_pred, n, mean, m2), jackknife(full_loss, total / m)


def _calibration(model: FunctionalModel, models: ModelTable, cal: Calibration, ch: Chunks, dtype: torch.dtype
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Calibration points sorted by model (order statistics and counts do not depend on the order):
    (model_of (n,), the model's first row for every model-chunk boundary, R (n,) the scores)."""
    n = len(cal.rows)
    if cal.model_of.shape != (n,):
        raise InputError(f"model_of must hold one model per calibration point ({n}), got shape "
                         f"{tuple(cal.model_of.shape)}")
    if n < 1:
        raise InputError("conformal prediction needs at least 1 calibration point, got 0")
    lo, hi = int(cal.model_of.min()), int(cal.model_of.max())
    if lo < 0 or hi >= len(models):
        raise InputError(f"model_of must index the {len(models)} models, got values in [{lo}, {hi}]")
    order = torch.argsort(cal.model_of, stable=True)
    mo, rows = cal.model_of[order], cal.rows[order]
    starts = torch.searchsorted(mo, torch.arange(0, len(models) + ch.models, ch.models).clamp(max=len(models)))
    R = torch.empty(n, dtype=dtype)
    for s, th in models.chunks(ch.models):
        a, b = int(starts[s // ch.models]), int(starts[s // ch.models + 1])
        th = th.to(dtype)
        for r in range(a, b, ch.models):
            r2 = min(b, r + ch.models)
            own = own_rows(model, th[mo[r:r2] - s], cal.X[rows[r:r2]].to(dtype))
            y = cal.y[rows[r:r2]]
            if model.task == "regression":
                R[r:r2] = (y - own).abs()                        # R_i = |y_i − μ̂_(i)(x_i)|
            else:
                R[r:r2] = 1 - own.gather(1, y[:, None])[:, 0]   # R_i = 1 − p̂_(i)(y_i | x_i)
    return mo, starts, R


def streamed_intervals(model: FunctionalModel, models: ModelTable | Tensor, cal: Calibration, X: Tensor,
                       alpha: float, *, memory_mb: float = DEFAULT_MEMORY_MB, chunks: Chunks | None = None
                       ) -> tuple[Tensor, Tensor]:
    """Jackknife+ (or CV+) intervals for m test points (Barber et al. 2021), streamed.

    Equal to :func:`~.conformal.jackknife_plus_intervals` on the dense predictions: the
    ⌊α(n + 1)⌋-th smallest of μ̂_(i)(x) − R_i and the ⌈(1 − α)(n + 1)⌉-th smallest of
    μ̂_(i)(x) + R_i, exactly, from an (n × test-chunk) buffer.

    Args:
      model: a regression architecture.
      models: the leave-one-out (jackknife+) or fold (CV+) models.
      cal: the calibration points and the model without each (:class:`Calibration`).
      X: (m, d) test features.
      alpha: miscoverage level in (0, 1).
      memory_mb: working-memory budget (see :func:`plan_chunks`); ``chunks`` overrides it.

    Returns:
      (lower (m,), upper (m,)).
    """
    alpha = check_alpha(alpha)
    if model.task != "regression":
        raise InputError("prediction intervals need a regression model; classification gives sets "
                         "(streamed_sets)")
    n = len(cal.rows)
    models, ch = _prepare(model, models, X, memory_mb, chunks, quantile_rows=n)
    mo, starts, R = _calibration(model, models, cal, ch, X.dtype)
    if not isinstance(models, TensorTable) and 4 * len(models) * models.p * 8 <= _budget(memory_mb):
        # small enough: read once rather than once per test chunk
        models = TensorTable(torch.cat([th.to(X.dtype) for _, th in models.chunks(ch.models)]))
    k_lo, k_hi = math.floor(alpha * (n + 1)), math.ceil((1 - alpha) * (n + 1))
    m = X.shape[0]
    lower, upper = torch.empty(m, dtype=X.dtype), torch.empty(m, dtype=X.dtype)
    for j in range(0, m, ch.tests):
        Xt = X[j:j + ch.tests]
        P = torch.empty(n, Xt.shape[0], dtype=X.dtype)               # μ̂_(i)(x) for the chunk's x
        for s, th in models.chunks(ch.models):
            a, b = int(starts[s // ch.models]), int(starts[s // ch.models + 1])
            if a < b:
                torch.index_select(predict(model, th.to(X.dtype), Xt), 0, mo[a:b] - s, out=P[a:b])
        low = P - R[:, None]
        lower[j:j + len(Xt)] = _kth(low, k_lo, lower_inf=True)
        del low
        P += R[:, None]
        upper[j:j + len(Xt)] = _kth(P, k_hi, lower_inf=False)
    return lower, upper


def streamed_sets(model: FunctionalModel, models: ModelTable | Tensor, cal: Calibration, X: Tensor, alpha: float,
                  *, memory_mb: float = DEFAULT_MEMORY_MB, chunks: Chunks | None = None,
                  shift: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Conformal classification sets, jackknife+/CV+ style, streamed (the models read once).

    Equal to :func:`~.conformal.jackknife_plus_sets` on the dense probabilities: label y is in
    the set of x when #{i : 1 − p̂_(i)(y | x) > R_i} < (1 − α)(n + 1), the counts summed over
    chunks of models and of calibration points.

    Args:
      model: a classification architecture.
      models: the leave-one-out (jackknife+) or fold (CV+) models.
      cal: the calibration points and the model without each (:class:`Calibration`).
      X: (m, d) test features.
      alpha: miscoverage level in (0, 1).
      memory_mb: working-memory budget (see :func:`plan_chunks`); ``chunks`` overrides it.
      shift: (m,) how far any comparison s_i(x, y) − R_i of test row x can move when every model is
        replaced by its exact refit (:func:`~.conformal.score_shift_bound`); with it, the memberships
        certain to be the exact refits' are returned too.

    Returns:
      (m, c) bool membership; with ``shift``, ``(membership, certain)``: ``certain[j, y]`` is True
      when the count of label y stays on the same side of the threshold for every comparison moved
      by up to ``shift[j]`` (comparisons within it may flip either way).
    """
    alpha = check_alpha(alpha)
    if model.task != "classification":
        raise InputError("conformal sets need a classification model; regression gives intervals "
                         "(streamed_intervals)")
    n = len(cal.rows)
    models, ch = _prepare(model, models, X, memory_mb, chunks)
    mo, starts, R = _calibration(model, models, cal, ch, X.dtype)
    m = X.shape[0]
    counts = torch.zeros(m, model.n_classes, dtype=torch.int64)
    sure = maybe = None   # with shift: the comparisons above R_i + Δ(x), and above R_i − Δ(x)
    if shift is not None:
        sure, maybe = torch.zeros_like(counts), torch.zeros_like(counts)
    for s, th in models.chunks(ch.models):
        a, b = int(starts[s // ch.models]), int(starts[s // ch.models + 1])
        if a == b:
            continue
        th = th.to(X.dtype)
        for j in range(0, m, ch.tests):
            scores = 1 - predict(model, th, X[j:j + ch.tests])       # (k, t, c) s(x, y; μ̂_b)
            for r in range(a, b, ch.models):
                r2 = min(b, r + ch.models)
                local = mo[r:r2] - s
                own = scores if r2 - r == len(th) and bool((local == torch.arange(len(th))).all()) \
                    else scores[local]
                counts[j:j + ch.tests] += (own > R[r:r2, None, None]).sum(0)
                if shift is not None:
                    d = shift[j:j + ch.tests].to(own.dtype)[None, :, None]
                    sure[j:j + ch.tests] += (own > R[r:r2, None, None] + d).sum(0)
                    maybe[j:j + ch.tests] += (own >= R[r:r2, None, None] - d).sum(0)
    threshold = (1 - alpha) * (n + 1)
    sets = counts < threshold
    if shift is None:
        return sets
    # the exact count lies in [sure, maybe]: the membership is certain when both ends agree
    return sets, (sure < threshold) == (maybe < threshold)
