"""Jackknife+ with the scikit-learn estimators at their default settings, against exact refits.

    python -m benchmarks.sklearn_defaults            # 4 bundled data sets × every estimator kind, 300 rows
    python -m benchmarks.sklearn_defaults --quick    # 120 rows

For each of scikit-learn's bundled sets (diabetes, breast cancer, digits, wine) and each estimator
kind (``DeltaGradRegressor`` linear and MLP on diabetes, ``DeltaGradClassifier`` logreg and MLP on
the others), with default settings on the raw features: ``CrossConformalRegressor`` /
``CrossConformalClassifier`` with ``cv=-1`` (jackknife+, one leave-one-out model per training row)
and ``verify=59``, beside the same class with ``exact=True`` (every leave-one-out model retrained
exactly: the ground truth MAPIE's refits give for GD). One JSON line each:

* regression: ``endpoint_diff_max``, the largest |end point − exact end point| over the test rows as
  a fraction of the mean interval width; classification: ``sets_identical``, the share of test rows
  whose set equals the exact one;
* ``coverage`` (ours) and ``coverage_exact``; ``verification``: the bound on 95% of the leave-one-out
  models at 95% confidence and the largest drawn error; ``model_error_max``: the largest error of any
  leave-one-out model against its exact refit (‖θ_DG − θ_exact‖ / ‖θ_exact − θ_full‖);
* ``seconds`` and ``exact_seconds``: the two ``fit_conformalize`` calls.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch
from sklearn import datasets
from sklearn.model_selection import train_test_split

from deltagrad_ray.sklearn import (CrossConformalClassifier, CrossConformalRegressor, DeltaGradClassifier,
                                   DeltaGradRegressor)

CASES = [("diabetes", "linear"), ("diabetes", "mlp"), ("breast_cancer", "logreg"), ("breast_cancer", "mlp"),
         ("digits", "logreg"), ("digits", "mlp"), ("wine", "logreg"), ("wine", "mlp")]


def run(data: str, kind: str, rows: int) -> dict:
    X, y = getattr(datasets, f"load_{data}")(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
    Xtr, ytr = Xtr[:rows], ytr[:rows]
    regression = data == "diabetes"
    est = DeltaGradRegressor(kind) if regression else DeltaGradClassifier(kind)
    cls = CrossConformalRegressor if regression else CrossConformalClassifier
    t0 = time.perf_counter()
    ours = cls(est, confidence_level=0.9, cv=-1, random_state=0, verify=59).fit_conformalize(Xtr, ytr)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = cls(est, confidence_level=0.9, cv=-1, random_state=0, exact=True).fit_conformalize(Xtr, ytr)
    exact_seconds = time.perf_counter() - t0
    full = ours._core.params_.double()
    err = (ours._thetas - exact._thetas).double().norm(dim=1) / (exact._thetas.double() - full).norm(dim=1)
    v = ours.verification_
    out = {"benchmark": "sklearn_defaults", "data": data, "kind": kind, "rows": len(ytr), "test_rows": len(yte),
           "model_error_max": float(f"{float(err.max()):.3g}"),
           "verification": {"bound": v.bound, "max_error": v.max_error, "sampled": v.sampled},
           "seconds": round(seconds, 2), "exact_seconds": round(exact_seconds, 2)}
    if regression:
        _, pis = ours.predict_interval(Xte)
        _, ref = exact.predict_interval(Xte)
        width = float(np.mean(ref[:, 1, 0] - ref[:, 0, 0]))
        out["endpoint_diff_max"] = float(f"{float(np.abs(pis - ref).max()) / width:.3g}")
        out["coverage"] = float(np.mean((yte >= pis[:, 0, 0]) & (yte <= pis[:, 1, 0])))
        out["coverage_exact"] = float(np.mean((yte >= ref[:, 0, 0]) & (yte <= ref[:, 1, 0])))
    else:
        _, sets = ours.predict_set(Xte)
        _, ref = exact.predict_set(Xte)
        out["sets_identical"] = float(np.mean((sets[:, :, 0] == ref[:, :, 0]).all(axis=1)))
        labels = np.searchsorted(ours.estimator_.classes_, yte)
        out["coverage"] = float(np.mean(sets[np.arange(len(yte)), labels, 0]))
        out["coverage_exact"] = float(np.mean(ref[np.arange(len(yte)), labels, 0]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="120 training rows instead of 300")
    ap.add_argument("--only", default=None, help="comma-separated data:kind cases (default: all)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cases = CASES if not args.only else [tuple(c.split(":")) for c in args.only.split(",")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning at the defaults would be part of the result: fail
        for data, kind in cases:
            print(json.dumps(run(data, kind, 120 if args.quick else 300)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
