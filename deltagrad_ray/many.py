"""Many change sets over one cache: leave-one-out, jackknife, influence, conformal prediction.

The API behind ``deltagrad-ray loo | jackknife | influence | conformal``. Requests are
replayed in batches (:func:`~deltagrad_ray.core.replay.deltagrad_batched`); results come
back in the order of the requests. Test rows (``test``) may come in any form
:func:`~deltagrad_ray.store.inputs.as_dataset` takes: arrays as ``(X, y)`` or ``X`` alone, DataFrames,
pyarrow Tables, Parquet locations, ``ray.data.Dataset``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .core.data import ChangeSet, Dataset, validate
from .core.errors import InputError
from .core.config import DeltaGradConfig
from .core.requests import fold_assignment, k_fold, leave_one_out
from .distributed.backends import SerialBackend, backend as backend
from .distributed.collect import RunReport
from .store.parts import ResultSink, discard_parts
from .results import estimate_columns, estimate_summary
from .stats import (DEFAULT_MEMORY_MB, Calibration, ModelTable, as_table, check_memory_mb, endpoint_shift_bound,
                    loo_influence, predict, score_shift_bound, streamed_intervals, streamed_jackknife, streamed_sets,
                    streamed_test_loss)
from .store.cache import Cache, labels_only
from .store.datasets import read_dataset
from .store.inputs import as_dataset, has_labels, in_project_layout, is_location
from .store.location import Location

@dataclass
class Fanout:
    """How many change sets are replayed: backend, batch size, DeltaGrad settings, output.

    Fields:
      backend: :class:`SerialBackend` (default), :class:`RayBackend`, or :class:`ExactBackend`
        (exact retraining for every request: the ground truth, for verification).
      batch_size: requests per batch (B).
      config: DeltaGrad settings.
      gemm_dtype: precision of the batched explicit-step GEMMs (linear models).
      parts: location for incremental, resumable results (see :class:`ResultSink`).
      progress: ``progress(n_done)`` callback (a tqdm bar on the CLI).
    """

    backend: Any = field(default_factory=SerialBackend)
    batch_size: int = 32
    config: DeltaGradConfig = field(default_factory=DeltaGradConfig)
    gemm_dtype: torch.dtype | None = None
    parts: str | None = None
    progress: Callable[[int], None] | None = None

    def run(self, cache: Cache, data: Dataset, changes: list[ChangeSet], data_uri=None) -> RunReport:
        sink = None
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch size must be an integer >= 1, got {self.batch_size!r}")  # before the parts
        if self.parts is not None:
            sink = ResultSink(self.parts, {"cache": cache.manifest.run_id, "batch_size": self.batch_size,
                                           "config": self.config.to_dict(), "gemm": str(self.gemm_dtype),
                                           "requests": _fingerprint(changes)})
        return self.backend.run(cache, data_uri, changes, batch_size=self.batch_size, config=self.config,
                                gemm_dtype=self.gemm_dtype, sink=sink, progress=self.progress, data=data)


    def discard_parts(self) -> None:
        """Delete the incremental parts (after the final output is written from them)."""
        if self.parts is not None:
            discard_parts(self.parts)


def _fingerprint(changes: list[ChangeSet]) -> str:
    import hashlib
    h = hashlib.sha256()
    for c in changes:
        h.update(c.delete.cpu().numpy().tobytes())
        h.update(b"|")
        if c.add is not None:
            h.update(c.add.ids.cpu().numpy().tobytes())
        h.update(b";")
    return h.hexdigest()


class ExactBackend:
    """Exact retraining for every request (T full passes each): the ground truth."""

    name = "exact"

    def run(self, cache, data_uri, changes, *, data=None, progress=None, **_) -> RunReport:
        from .core.train import retrain
        traj = cache.trajectory(data.X.device)
        params = torch.stack([retrain(cache.model, traj, data, ch) for ch in changes])
        n = len(changes)
        counters = {"explicit_steps": torch.full((n,), traj.steps), "approx_steps": torch.zeros(n, dtype=torch.int64),
                    "fallbacks": torch.zeros(n, dtype=torch.int64), "skipped_pairs": torch.zeros(n, dtype=torch.int64)}
        # exact retraining: no approximate step, so nothing to estimate (certificate.BASIS_EXACT)
        zeros = torch.zeros(n, dtype=torch.float64)
        stats = {"backend": "exact", "error_estimate": zeros, "error_absolute": zeros.clone(),
                 "error_reliable": torch.ones(n, dtype=torch.bool)}
        return RunReport(params, counters, {}, stats)


def _checked(report: RunReport, labels: Tensor, what: str) -> RunReport:
    """Statistics need every model: name the requests that failed."""
    if report.errors:
        shown = ", ".join(f"{int(labels[i])} ({e})" for i, e in list(report.errors.items())[:3])
        raise InputError(f"{len(report.errors)} {what} replay(s) failed, e.g. {shown}")
    return report


class ManyResult(NamedTuple):
    """Replayed models for a list of requests, in request order."""

    ids: Tensor              # (B,) the id each LOO request left out
    params: Tensor | None    # (B, p), or None when they stay in the results' parts (too many to hold)
    replay: RunReport
    verification: Any = None  # stats.verification.Verification when ``verify=K`` was asked

    @property
    def request_ids(self) -> Tensor:
        """What each request left out (messages name a request by it)."""
        return self.ids

    @property
    def models(self) -> ModelTable:
        """The models as a table, read a chunk at a time (from memory or from the results' parts)."""
        return self.replay.models if self.replay.models is not None else as_table(self.params)

    @property
    def error_estimate(self) -> Tensor:
        """(B,) each request's error estimate ≈ ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_full‖
        (:mod:`~deltagrad_ray.core.certificate`; inf: not certified closer than the full model, NaN:
        failed; 0 for requests retrained exactly)."""
        return self.replay.stats["error_estimate"]

    @property
    def method(self) -> list[str]:
        """Per request: ``"deltagrad"``, or ``"exact"`` when ``exact_above`` retrained it."""
        exact = self.replay.stats.get("retrained")
        return ["exact" if exact is not None and bool(exact[i]) else "deltagrad" for i in range(len(self.ids))]

    def table(self) -> dict:
        """One row per request: id, params (a ModelTable when they stay in the parts), the replay's
        counters, the error estimate, the method and the failure reason (None when it succeeded)."""
        c = self.replay.counters
        return {"id": self.ids, "params": self.params if self.params is not None else self.models,
                "explicit_steps": c["explicit_steps"], "approx_steps": c["approx_steps"], "fallbacks": c["fallbacks"],
                **estimate_columns(self.replay), "method": self.method,
                "error": [self.replay.errors.get(i) for i in range(len(self.ids))]}

    def summary(self) -> dict:
        """The run in a few numbers (the summary line): :func:`replay_summary` and the evidence."""
        return {**replay_summary(self.replay), **evidence(self)}


def replay_summary(report: RunReport) -> dict:
    """A fan-out's replays in a few numbers: requests, mean explicit steps, fallbacks, failures, the
    backend, and the error estimates' median and largest value (:func:`~.results.estimate_summary`)."""
    c = report.counters
    return {"requests": len(c["explicit_steps"]), "explicit_steps_mean": float(c["explicit_steps"].double().mean()),
            "fallbacks": int(c["fallbacks"].sum()), "failed": len(report.errors),
            "backend": report.stats.get("backend"),
            **estimate_summary(report)}


def evidence(res: ManyResult | _FromLoo | ConformalResult) -> dict:
    """What ``exact_above`` reran and what ``verify`` showed (the verification as a dict)."""
    out = {}
    if "retrained" in res.replay.stats:
        out["retrained_exactly"] = res.method.count("exact")
    if res.verification is not None:
        out["verification"] = res.verification.summary()
    return out


class _Fields:
    """Dict-style reads of a result's fields, as when these results were dicts: ``r["lower"]``,
    ``r.get("coverage")``, and ``"sets" in r`` (the field is set)."""

    def __getitem__(self, key: str):
        if not isinstance(key, str) or key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key in self.__dataclass_fields__ and getattr(self, key) is not None

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self else default


class _FromLoo(_Fields):
    """A statistic of leave-one-out models (``loo``, a :class:`ManyResult`): their replay, their
    verification and method per request, and the summary line (the statistic's metadata, then the
    replays')."""

    @property
    def replay(self) -> RunReport:
        return self.loo.replay

    @property
    def verification(self):
        return self.loo.verification

    @property
    def request_ids(self) -> Tensor:
        return self.loo.ids

    @property
    def method(self) -> list[str]:
        return self.loo.method

    def summary(self) -> dict:
        return {**self.metadata(), **self.loo.summary()}


@dataclass(frozen=True)
class JackknifeResult(_FromLoo):
    """Jackknife estimates of the test predictions and of the mean test loss (:func:`jackknife`)."""

    test_ids: Tensor
    predictions: Any          # stats.Jackknife of the (m, …) test predictions (probabilities for classification)
    test_loss: Any            # stats.Jackknife of the mean test loss
    n_loo: int
    loo: ManyResult           # the leave-one-out models it used

    def table(self) -> dict:
        p = self.predictions
        return {"id": self.test_ids, "estimate": p.estimate, "bias": p.bias, "bias_corrected": p.bias_corrected,
                "se": p.se}

    def metadata(self) -> dict:
        loss = self.test_loss
        return {"test_loss": {k: float(getattr(loss, k)) for k in ("estimate", "bias", "bias_corrected", "se")},
                "n_loo": self.n_loo}


@dataclass(frozen=True)
class InfluenceResult(_FromLoo):
    """Per training id, the leave-one-out change in mean test loss (:func:`influence`)."""

    ids: Tensor
    influence: Tensor
    test_loss: float          # of the full model
    loo: ManyResult

    def table(self) -> dict:
        return {"id": self.ids, "influence": self.influence, **estimate_columns(self.replay), "method": self.method}

    def metadata(self) -> dict:
        return {"test_loss": self.test_loss}


@dataclass(frozen=True)
class ConformalResult(_Fields):
    """Jackknife+ / CV+ intervals (regression) or sets (classification) for the test rows
    (:func:`conformal`), in test-set order."""

    ids: Tensor
    prediction: Tensor        # the full model's prediction (class index for classification)
    method: str               # jackknife+ or cv+
    alpha: float
    n_models: int
    n_calibration: int
    replay: RunReport
    lower: Tensor | None = None
    upper: Tensor | None = None
    sets: Tensor | None = None          # (m, c) bool
    mean_width: float | None = None
    mean_set_size: float | None = None
    coverage: float | None = None       # when the test set has labels
    y: Tensor | None = None
    endpoint_bound: Tensor | None = None  # (m,) regression: how far an end point can be from the exact refits'
    set_certain: Tensor | None = None     # (m,) classification: the set is certain to be the exact refits'
    verification: Any = None  # stats.verification.Verification of the models, when ``verify=K`` was asked

    def table(self) -> dict:
        cols = {"id": self.ids, "prediction": self.prediction}
        if self.sets is not None:
            cols["set"] = [[int(i) for i in row.nonzero().reshape(-1)] for row in self.sets]
        else:
            cols["lower"], cols["upper"] = self.lower, self.upper
        if self.endpoint_bound is not None:
            cols["endpoint_bound"] = self.endpoint_bound
        if self.set_certain is not None:
            cols["set_certain"] = self.set_certain
        return cols

    def metadata(self) -> dict:
        out = {"method": self.method, "alpha": self.alpha, "models": self.n_models, "calibration": self.n_calibration}
        out.update({k: getattr(self, k) for k in ("mean_width", "mean_set_size", "coverage") if k in self})
        if self.endpoint_bound is not None:
            out["endpoint_bound_max"] = float(f"{float(self.endpoint_bound.max()):.4g}")
        if self.set_certain is not None:
            out["sets_certain"] = float(f"{float(self.set_certain.double().mean()):.4g}")
        return out

    @property
    def request_ids(self) -> None:
        """None: messages name a request by its position (a fold, or the i-th calibration point)."""
        return None

    def summary(self) -> dict:
        return {**self.metadata(), **replay_summary(self.replay), **evidence(self)}


def _cache(cache: Cache | str | Location) -> Cache:
    """An open cache; a models prefix (bulk erasure's output) gives its published version."""
    from .store.registry import open_resolved
    return open_resolved(cache)


def _test_set(cache: Cache, test: Dataset | str | Location, labels: bool = True) -> Dataset:
    """The test rows, validated against the cache's model; labels needed only when ``labels``, and
    checked whenever the test set has them (a label outside the model's classes, or −1, is refused
    by every command alike: the coverage would otherwise index past the classes)."""
    if isinstance(test, Dataset) or (is_location(test) and in_project_layout(test, labels=False)):
        ds = test if isinstance(test, Dataset) else read_dataset(test, regression=cache.spec.task == "regression",
                                                                 labels_optional=not labels)
    else:  # arrays, (X, y) tuples, DataFrames, pyarrow Tables, Ray Data, other Parquet layouts
        ds = as_dataset(test, task=cache.spec.task, n_classes=cache.n_classes, labels=labels, what="test set")
    if labels or has_labels(test):
        validate(ds, n_features=cache.spec.n_features, n_classes=cache.n_classes, what="test set")
    else:  # only the features matter
        validate(Dataset(ds.X, ds.X.new_zeros(len(ds)), ds.ids), n_features=cache.spec.n_features, what="test set")
    return ds.to(dtype=cache.dtype)


def _left_out(ds: Dataset, changes: list[ChangeSet]) -> Tensor:
    """The ids the change sets delete, in request order."""
    return ds.ids[torch.cat([ch.delete for ch in changes]).cpu()]


def loo(cache: Cache | str | Location, ids: Sequence[int] | Tensor | None = None, *, fanout: Fanout | None = None,
        data: str | Location | None = None, strict: bool = False, verify: int | None = None,
        quantile: float = 0.95, confidence: float = 0.95, seed: int = 0,
        exact_above: float | None = None) -> ManyResult:
    """Leave-one-out models for ``ids`` (default: every training point still in the cache).

    Failed requests (isolated by the backend) come back as NaN rows, listed in
    ``result.replay.errors``; with ``strict`` they raise instead.

    ``verify=K``: K requests drawn at random are also retrained exactly (batched) and
    ``result.verification`` states, with probability ≥ ``confidence`` over the draw, a bound on the
    error of at least a fraction ``quantile`` of ALL requests (:mod:`.stats.verification`).

    ``exact_above=E``: every request whose error estimate exceeds E (or is not finite) is retrained
    exactly (batched) and its model replaced (:func:`rerun_exact`); the verification, if asked,
    then measures the models as returned.
    """
    check_exact_above(exact_above)
    if verify is not None:
        from .stats.verification import check_settings
        check_settings(verify, quantile, confidence)  # before any replay
    c = _cache(cache)
    fan = fanout or Fanout()
    # Ray actors load (and verify) the data themselves: the driver needs only ids, not features
    ds = labels_only(c, data) if getattr(fan.backend, "name", None) == "ray" else c.data(data)
    # ids already removed from the trajectory (a derived cache) are refused, as by `unlearn`
    changes = leave_one_out(ds, ids, removed=c.removed_mask())
    ids = _left_out(ds, changes)
    rep = fan.run(c, ds, changes, data)
    if strict:
        _checked(rep, ids, "leave-one-out")
    res = ManyResult(ids, None if rep.params is None else rep.params.to(c.dtype), rep)
    if exact_above is not None:
        res = rerun_exact(c, res, exact_above, data=data, batch_size=fan.batch_size)
    if verify is not None:
        res = res._replace(verification=verify_sample(c, res, verify, quantile=quantile, confidence=confidence,
                                                      seed=seed, data=data))
    return res


def check_exact_above(value: float | None) -> None:
    import math
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or math.isnan(value) or value < 0):
        raise InputError(f"exact_above must be a number >= 0 (the largest error estimate kept without an exact "
                         f"retraining), got {value!r}")


def rerun_exact(cache: Cache | str | Location, result: ManyResult, above: float, *,
                data: str | Location | None = None, batch_size: int = 32) -> ManyResult:
    """Retrain exactly (batched, :func:`~.core.replay.retrain_batched`) every leave-one-out request of
    ``result`` whose error estimate is above ``above`` or not finite, and return the result with their
    models replaced, their estimate 0 and ``stats["retrained"]`` marking them (``result.method``).
    Failed requests stay failed. The models must be in memory (``result.params``)."""
    from .core.replay import retrain_batched
    check_exact_above(above)
    c = _cache(cache)
    rep = result.replay
    est = rep.stats.get("error_estimate")
    if est is None:
        raise InputError("these results carry no error estimate (made by another backend): nothing to rerun by")
    failed = torch.zeros(len(result.ids), dtype=torch.bool)
    failed[list(rep.errors)] = True
    due = (~failed & ~(est <= above)).nonzero().reshape(-1)   # NaN and inf are never <= above
    retrained = torch.zeros(len(result.ids), dtype=torch.bool)
    stats = {**rep.stats, "retrained": retrained, "exact_above": above}
    if len(due) == 0:
        return result._replace(replay=rep._replace(stats=stats))
    if result.params is None:
        raise InputError(f"{len(due)} requests need an exact retraining but the models are not in memory "
                         "(raise max_model_mb, or rerun those ids with the exact backend)")
    ds = c.data(data)
    changes = leave_one_out(ds, result.ids[due], removed=c.removed_mask())
    exact = retrain_batched(c.model, c.trajectory(), ds, changes, batch_size=batch_size)
    params = result.params.clone()
    params[due] = exact.to(params.dtype)
    est, absolute = est.clone(), rep.stats["error_absolute"].clone()
    est[due] = absolute[due] = 0.0
    retrained[due] = True
    reliable = rep.stats["error_reliable"].clone()
    reliable[due] = True
    stats.update(error_estimate=est, error_absolute=absolute, error_reliable=reliable)
    models = as_table(params) if rep.models is not None else None
    return result._replace(params=params, replay=rep._replace(params=params, stats=stats, models=models))


def verify_sample(cache: Cache | str | Location, result: ManyResult, k: int, *, quantile: float = 0.95,
                  confidence: float = 0.95, seed: int = 0, data: str | Location | None = None):
    """Retrain K drawn leave-one-out requests of ``result`` exactly and state the guarantee
    (:func:`~.stats.verification.verification`). Failed requests are not drawn."""
    c = _cache(cache)
    ds = c.data(data)
    return _verify_replays(c, ds, result.replay, result.models,
                           lambda idx: leave_one_out(ds, result.ids[idx], removed=c.removed_mask()),
                           k, quantile=quantile, confidence=confidence, seed=seed)


def _verify_replays(c: Cache, ds: Dataset, replay: RunReport, models: ModelTable,
                    changes_of: Callable[[Tensor], list[ChangeSet]], k: int, *, quantile: float,
                    confidence: float, seed: int):
    """The verification of any fan-out: K of its successful requests drawn, their change sets
    (``changes_of(indices)``) retrained exactly (batched), and the order-statistic guarantee stated."""
    from .core.replay import retrain_batched
    from .stats.verification import check_settings, draw, verification
    check_settings(k, quantile, confidence)
    n = len(replay.counters["explicit_steps"])
    ok = torch.tensor([i for i in range(n) if i not in replay.errors], dtype=torch.int64)
    if len(ok) == 0:
        raise InputError("no request succeeded: nothing to verify")
    idx = ok[draw(len(ok), k, seed)]
    exact = retrain_batched(c.model, c.trajectory(), ds, changes_of(idx))
    replayed = models.rows(idx)
    return verification(replayed.to(exact.dtype), exact, c.final.to(exact.dtype), idx, len(ok),
                        quantile=quantile, confidence=confidence)


def predict_many(cache: Cache, thetas: Tensor, X: Tensor) -> Tensor:
    """Outputs of B models on m rows: (B, m) predictions (regression) or (B, m, c) probabilities.

    Dense: B × m at once. The statistics below stream instead (:mod:`deltagrad_ray.stats.streaming`).
    """
    return predict(cache.model, thetas, X)


def _models(params: Tensor | ModelTable) -> ModelTable:
    """The replayed models as a table (a report's in-memory (N, p) params, or a table already)."""
    return as_table(params)


def jackknife(cache: Cache | str | Location, test, ids=None, *,
              fanout: Fanout | None = None, data=None, loo_result: ManyResult | None = None,
              memory_mb: float = DEFAULT_MEMORY_MB, verify: int | None = None, exact_above: float | None = None,
              seed: int = 0) -> dict:
    """Jackknife estimates, bias-corrected estimates and standard errors of the test predictions
    (probabilities for classification) and of the mean test loss.

    Args:
      cache, test, ids, fanout, data: as for :func:`loo`; ``test`` needs labels.
      loo_result: leave-one-out models already replayed (reused instead of a new fan-out).
      memory_mb: working memory of the statistics: they stream over chunks of models and test
        points (:func:`~deltagrad_ray.stats.streamed_jackknife`), never all of them at once.
      verify, exact_above, seed: as for :func:`loo` (the leave-one-out models the statistics use).

    Returns:
      a :class:`JackknifeResult`: ``test_ids``, ``predictions`` and ``test_loss``
      (:class:`~deltagrad_ray.stats.Jackknife`), ``n_loo``, ``replay``, ``verification`` (None unless ``verify``).
    """
    check_memory_mb(memory_mb)
    c = _cache(cache)
    t = _test_set(c, test)
    res = loo_result or loo(c, ids, fanout=fanout, data=data, strict=True, verify=verify, exact_above=exact_above,
                            seed=seed)
    pred, loss = streamed_jackknife(c.model, c.final, _models(res.models), t.X, t.y, memory_mb=memory_mb)
    return JackknifeResult(t.ids, pred, loss, len(res.ids), res)


def influence(cache: Cache | str | Location, test, ids=None, *,
              fanout: Fanout | None = None, data=None, loo_result: ManyResult | None = None,
              memory_mb: float = DEFAULT_MEMORY_MB, verify: int | None = None, exact_above: float | None = None,
              seed: int = 0) -> dict:
    """Per training id, the leave-one-out change in mean test loss L(θ_(i)) − L(θ̂).

    Args:
      cache, test, ids, fanout, data, loo_result: as for :func:`jackknife`.
      memory_mb: working memory of the test losses, accumulated over chunks of test points.
      verify, exact_above, seed: as for :func:`loo`.

    Returns:
      an :class:`InfluenceResult`: ``ids``, ``influence`` (per id), ``test_loss`` (of the full model),
      ``replay``, ``verification`` (None unless ``verify``), ``method`` (per id: deltagrad or exact).
    """
    check_memory_mb(memory_mb)
    c = _cache(cache)
    t = _test_set(c, test)
    res = loo_result or loo(c, ids, fanout=fanout, data=data, strict=True, verify=verify, exact_above=exact_above,
                            seed=seed)
    full = streamed_test_loss(c.model, c.final[None], t.X, t.y, memory_mb=memory_mb)[0]
    losses = streamed_test_loss(c.model, _models(res.models), t.X, t.y, memory_mb=memory_mb)
    return InfluenceResult(res.ids, loo_influence(full, losses), float(full), res)


def conformal(cache: Cache | str | Location, test, alpha: float = 0.1, *,
              method: str = "jackknife+", folds: int = 10, ids=None, seed: int = 0,
              fanout: Fanout | None = None, data=None, memory_mb: float = DEFAULT_MEMORY_MB,
              verify: int | None = None, quantile: float = 0.95, confidence: float = 0.95) -> ConformalResult:
    """Jackknife+ / CV+ intervals (regression) or sets (classification) for the test rows.

    Args:
      cache, test, ids, fanout, data: as for :func:`loo`; ``test`` needs no labels (with
        labels, the coverage is reported).
      alpha: miscoverage level in (0, 1).
      method: ``jackknife+`` (one leave-one-out model per id) or ``cv+`` (``folds`` fold
        models, seeded by ``seed``).
      memory_mb: working memory of the statistics: they stream over chunks of models and test
        points (:func:`~deltagrad_ray.stats.streamed_intervals`, :func:`~deltagrad_ray.stats.streamed_sets`),
        so the models × test points predictions are never held at once.
      verify, quantile, confidence: as for :func:`loo`: K of the models (leave-one-out or fold models)
        drawn at random are also retrained exactly, and ``verification`` states a bound on the error of
        a fraction ``quantile`` of all of them (the draw uses ``seed``).

    Returns:
      a :class:`ConformalResult`: ``ids`` and ``prediction`` (full model) per test row, and ``lower``, ``upper``
      or ``sets`` ((m, c) bool), in test-set order; ``mean_width`` or ``mean_set_size``,
      ``coverage`` when the test set has labels, ``n_models``, ``n_calibration``, ``replay``; for
      regression with reliable error estimates, ``endpoint_bound`` (m,): how far each end point can be
      from the exact refits' (:func:`~deltagrad_ray.stats.endpoint_shift_bound`).
    """
    from .stats import check_alpha
    check_alpha(alpha)
    check_memory_mb(memory_mb)
    if verify is not None:
        from .stats.verification import check_settings
        check_settings(verify, quantile, confidence)  # before any replay
    if method not in ("jackknife+", "cv+"):
        raise InputError(f"method must be jackknife+ or cv+, got {method!r}")
    c = _cache(cache)
    t = _test_set(c, test, labels=False)
    labelled = has_labels(test)
    ds = c.data(data)
    removed = c.removed_mask()
    if method == "jackknife+":
        changes = leave_one_out(ds, ids, removed=removed)
        ids = _left_out(ds, changes)
    else:
        changes = k_fold(ds, folds, ids=ids, seed=seed, removed=removed)
    replay = _checked((fanout or Fanout()).run(c, ds, changes, data), ids if method == "jackknife+"
                      else torch.arange(len(changes)), "leave-one-out" if method == "jackknife+" else "fold")
    models = replay.models if replay.models is not None else _models(replay.params)
    rows = torch.cat([ch.delete for ch in changes])            # the calibration points
    # the model that left each calibration point out: its own (jackknife+) or its fold's (CV+)
    model_of = torch.arange(len(rows)) if method == "jackknife+" else fold_assignment(ds, changes)[rows]
    cal = Calibration(ds.X, ds.y, rows, model_of)
    full_out = predict(c.model, c.final.to(t.X.dtype)[None], t.X, chunk=4096)[0]
    out = {"ids": t.ids, "n_models": len(models), "n_calibration": len(rows), "method": method,
           "alpha": alpha, "replay": replay}
    if verify is not None:
        out["verification"] = _verify_replays(c, ds, replay, models, lambda idx: [changes[i] for i in idx.tolist()],
                                              verify, quantile=quantile, confidence=confidence, seed=seed)
    # (the fields of ConformalResult, filled by task)
    # the models' error estimates, when every one rests on the convex basis and is finite: what the
    # statements about the intervals and sets below rest on (none otherwise)
    err, reliable = replay.stats.get("error_absolute"), replay.stats.get("error_reliable")
    certified = err if err is not None and bool(reliable.all()) and bool(err.isfinite().all()) else None
    if c.spec.task == "regression":
        out["prediction"] = full_out
        out["lower"], out["upper"] = lo, hi = streamed_intervals(c.model, models, cal, t.X, alpha,
                                                                 memory_mb=memory_mb)
        out["mean_width"] = float((hi - lo).mean())
        # how far each end point can be from the exact refits' (stats.endpoint_shift_bound)
        if certified is not None:
            out["endpoint_bound"] = endpoint_shift_bound(certified, model_of, ds.X[rows], t.X)
        if labelled:
            out["coverage"] = float(((t.y >= lo) & (t.y <= hi)).double().mean())
    else:
        out["prediction"] = full_out.argmax(-1)
        # which sets are certain to be the exact refits' (stats.score_shift_bound): a linear softmax model
        # only; an MLP's logits have no such bound
        shift = None
        if certified is not None and c.spec.kind == "logreg":
            shift = score_shift_bound(certified, model_of, ds.X[rows], t.X)
        sets = streamed_sets(c.model, models, cal, t.X, alpha, memory_mb=memory_mb, shift=shift)
        if shift is not None:
            sets, certain = sets
            out["set_certain"] = certain.all(1)
        out["sets"] = sets
        out["mean_set_size"] = float(sets.sum(1).double().mean())
        if labelled:
            out["coverage"] = float(sets[torch.arange(len(t)), t.y].double().mean())
    out["y"] = t.y if labelled else None
    return ConformalResult(**out)
