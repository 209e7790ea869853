"""Many change sets over one cache: leave-one-out, jackknife, influence, conformal prediction.

The API behind ``deltagrad-ray loo | jackknife | influence | conformal``. Requests are
replayed in batches (:func:`~deltagrad_ray.core.batched.deltagrad_batched`); results come
back in the order of the requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from .core.data import ChangeSet, Dataset, validate
from .core.errors import InputError
from .core.replay import DeltaGradConfig
from .core.requests import fold_assignment, k_fold, leave_one_out
from .distributed.backends import RunReport, SerialBackend
from .distributed.sink import ResultSink
from .stats import jackknife as _jackknife
from .stats import jackknife_plus_intervals, jackknife_plus_sets, loo_influence
from .store.cache import Cache, labels_only, open_cache
from .store.datasets import read_dataset
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
        if self.parts is not None:
            sink = ResultSink(self.parts, {"cache": cache.manifest["run_id"], "batch_size": self.batch_size,
                                           "config": self.config.to_dict(), "gemm": str(self.gemm_dtype),
                                           "requests": _fingerprint(changes)})
        return self.backend.run(cache, data_uri, changes, batch_size=self.batch_size, config=self.config,
                                gemm_dtype=self.gemm_dtype, sink=sink, progress=self.progress, data=data)


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
        return RunReport(params, counters, {}, {"backend": "exact"})


def _checked(report: RunReport, labels: Tensor, what: str) -> RunReport:
    """Statistics need every model: name the requests that failed."""
    if report.errors:
        shown = ", ".join(f"{int(labels[i])} ({e})" for i, e in list(report.errors.items())[:3])
        raise InputError(f"{len(report.errors)} {what} replay(s) failed, e.g. {shown}")
    return report


class ManyResult(NamedTuple):
    """Replayed models for a list of requests, in request order."""

    ids: Tensor              # (B,) the id each LOO request left out
    params: Tensor           # (B, p)
    replay: RunReport


def _cache(cache: Cache | str | Location) -> Cache:
    """An open cache; a models prefix (bulk erasure's output) gives its published version."""
    from .erasure import resolve_cache
    return cache if isinstance(cache, Cache) else open_cache(resolve_cache(cache))


def _test_set(cache: Cache, test: Dataset | str | Location, labels: bool = True) -> Dataset:
    """The test rows, validated against the cache's model; labels needed only when ``labels``."""
    ds = test if isinstance(test, Dataset) else read_dataset(test, regression=cache.spec.task == "regression",
                                                             labels_optional=not labels)
    if labels:
        validate(ds, n_features=cache.spec.n_features, n_classes=cache.n_classes, what="test set")
    else:  # only the features matter
        validate(Dataset(ds.X, ds.X.new_zeros(len(ds)), ds.ids), n_features=cache.spec.n_features, what="test set")
    return ds.to(dtype=cache.dtype)


def _loo_ids(c: Cache, ds: Dataset, ids) -> Tensor:
    if ids is None:
        removed = c.removed_mask()
        ids = ds.ids if removed is None else ds.ids[~removed]
    return torch.as_tensor(ids, dtype=torch.int64).reshape(-1)


def loo(cache: Cache | str | Location, ids: Sequence[int] | Tensor | None = None, *, fanout: Fanout | None = None,
        data: str | Location | None = None, strict: bool = False) -> ManyResult:
    """Leave-one-out models for ``ids`` (default: every training point still in the cache).

    Failed requests (isolated by the backend) come back as NaN rows, listed in
    ``result.replay.errors``; with ``strict`` they raise instead.
    """
    c = _cache(cache)
    fan = fanout or Fanout()
    # Ray actors load (and verify) the data themselves: the driver needs only ids, not features
    ds = labels_only(c, data) if getattr(fan.backend, "name", None) == "ray" else c.data(data)
    ids = _loo_ids(c, ds, ids)
    rep = fan.run(c, ds, leave_one_out(ds, ids), data)
    if strict:
        _checked(rep, ids, "leave-one-out")
    return ManyResult(ids, rep.params.to(c.dtype), rep)


def predict_many(cache: Cache, thetas: Tensor, X: Tensor) -> Tensor:
    """Outputs of B models on m rows: (B, m) predictions (regression) or (B, m, c) probabilities."""
    out = vmap(cache.model.forward, in_dims=(0, None))(thetas, X)
    if cache.spec.task == "regression":
        return out.reshape(thetas.shape[0], -1)
    return torch.softmax(out, dim=-1)


def _own_rows(cache: Cache, thetas: Tensor, X: Tensor) -> Tensor:
    """Model b evaluated on row b only: (B,) or (B, c)."""
    out = vmap(lambda t, x: cache.model.forward(t, x[None])[0])(thetas, X)
    return out.reshape(-1) if cache.spec.task == "regression" else torch.softmax(out, dim=-1)


def _test_loss(cache: Cache, thetas: Tensor, test: Dataset) -> Tensor:
    """Mean test loss of each of B models: (B,)."""
    out = vmap(cache.model.forward, in_dims=(0, None))(thetas, test.X)
    return vmap(lambda o: cache.model.loss(o, test.y).mean())(out)


def jackknife(cache: Cache | str | Location, test: Dataset | str | Location, ids=None, *,
              fanout: Fanout | None = None, data=None, loo_result: ManyResult | None = None) -> dict:
    """Jackknife estimates, bias-corrected estimates and standard errors of the test predictions
    (probabilities for classification) and of the mean test loss. ``loo_result`` reuses
    leave-one-out models already replayed."""
    c = _cache(cache)
    t = _test_set(c, test)
    res = loo_result or loo(c, ids, fanout=fanout, data=data, strict=True)
    full = c.final[None]
    pred = _jackknife(predict_many(c, full, t.X)[0], predict_many(c, res.params, t.X))
    loss = _jackknife(_test_loss(c, full, t)[0], _test_loss(c, res.params, t))
    return {"test_ids": t.ids, "predictions": pred, "test_loss": loss, "n_loo": len(res.ids), "replay": res.replay}


def influence(cache: Cache | str | Location, test: Dataset | str | Location, ids=None, *,
              fanout: Fanout | None = None, data=None, loo_result: ManyResult | None = None) -> dict:
    """Per training id, the leave-one-out change in mean test loss L(θ_(i)) − L(θ̂)."""
    c = _cache(cache)
    t = _test_set(c, test)
    res = loo_result or loo(c, ids, fanout=fanout, data=data, strict=True)
    full = _test_loss(c, c.final[None], t)[0]
    return {"ids": res.ids, "influence": loo_influence(full, _test_loss(c, res.params, t)),
            "test_loss": float(full), "replay": res.replay}


def conformal(cache: Cache | str | Location, test: Dataset | str | Location, alpha: float = 0.1, *,
              method: str = "jackknife+", folds: int = 10, ids=None, seed: int = 0,
              fanout: Fanout | None = None, data=None) -> dict:
    """Jackknife+ / CV+ intervals (regression) or sets (classification) for the test rows.

    Returns a dict with ``ids`` and ``prediction`` (full model) per test row, and ``lower``,
    ``upper`` or ``sets`` ((m, c) bool), in test-set order.
    """
    from .stats import check_alpha
    check_alpha(alpha)
    if method not in ("jackknife+", "cv+"):
        raise InputError(f"method must be jackknife+ or cv+, got {method!r}")
    c = _cache(cache)
    t = _test_set(c, test, labels=False)
    labelled = _has_labels(test)
    ds = c.data(data)
    ids = _loo_ids(c, ds, ids)
    if method == "jackknife+":
        changes = leave_one_out(ds, ids)
    else:
        changes = k_fold(ds, folds, ids=ids, seed=seed)
    replay = _checked((fanout or Fanout()).run(c, ds, changes, data), ids if method == "jackknife+"
                      else torch.arange(len(changes)), "leave-one-out" if method == "jackknife+" else "fold")
    params = replay.params.to(c.dtype)
    rows = torch.cat([ch.delete for ch in changes])            # the calibration points
    # the model that left each calibration point out: its own (jackknife+) or its fold's (CV+)
    model_of = torch.arange(len(rows)) if method == "jackknife+" else fold_assignment(ds, changes)[rows]
    X_tr, y_tr = ds.X[rows], ds.y[rows]
    own = _own_rows(c, params[model_of], X_tr)                  # μ̂_(i)(x_i)
    test_out = predict_many(c, params, t.X)[model_of]           # μ̂_(i)(x), (n, m[, c])
    full_out = predict_many(c, c.final[None], t.X)[0]
    out = {"ids": t.ids, "n_models": params.shape[0], "n_calibration": len(rows), "method": method,
           "alpha": alpha, "replay": replay}
    if c.spec.task == "regression":
        out["prediction"] = full_out
        out["lower"], out["upper"] = lo, hi = jackknife_plus_intervals(own, y_tr, test_out, alpha)
        out["mean_width"] = float((hi - lo).mean())
        if labelled:
            out["coverage"] = float(((t.y >= lo) & (t.y <= hi)).double().mean())
    else:
        out["prediction"] = full_out.argmax(-1)
        out["sets"] = sets = jackknife_plus_sets(own, y_tr, test_out, alpha)
        out["mean_set_size"] = float(sets.sum(1).double().mean())
        if labelled:
            out["coverage"] = float(sets[torch.arange(len(t)), t.y].double().mean())
    out["y"] = t.y if labelled else None
    return out


def _has_labels(test) -> bool:
    if isinstance(test, Dataset):
        return True
    from .store.datasets import column_names
    return "label" in column_names(test)
