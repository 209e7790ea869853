"""Jackknife+ prediction intervals on scikit-learn's diabetes data, MAPIE-style, timed beside MAPIE.

MAPIE's ``CrossConformalRegressor(cv=-1)`` refits the estimator once per training point (n exact
fits). ``deltagrad_ray.sklearn.CrossConformalRegressor`` has the same constructor and methods; it
fits once, recording the trajectory, and replays it without each point (DeltaGrad, batched).
Switching is an import change::

    from mapie.regression import CrossConformalRegressor            # before
    from deltagrad_ray.sklearn import CrossConformalRegressor       # after

Run: ``python examples/jackknife_plus_mapie.py [--steps 200] [--n-train 300]`` (needs MAPIE for
its rows: ``pip install "mapie>=1,<2"``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.datasets import load_diabetes

from deltagrad_ray.sklearn import CrossConformalRegressor, DeltaGradRegressor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="gradient-descent steps T of each fit")
    ap.add_argument("--n-train", type=int, default=300, help="training rows (the rest of the 442 are test rows)")
    ap.add_argument("--confidence", type=float, default=0.9)
    args = ap.parse_args()

    X, y = load_diabetes(return_X_y=True)
    perm = np.random.RandomState(0).permutation(len(X))
    X, y = (X[perm] - X.mean(0)) / X.std(0), y[perm]
    n = args.n_train
    X_train, y_train, X_test, y_test = X[:n], y[:n], X[n:], y[n:]
    est = DeltaGradRegressor(steps=args.steps, lr=0.1)

    rows = []

    def run(name: str, cls, **kw) -> np.ndarray:
        t0 = time.perf_counter()
        cp = cls(est, confidence_level=args.confidence, cv=-1, **kw).fit_conformalize(X_train, y_train)
        _, pis = cp.predict_interval(X_test)
        seconds = time.perf_counter() - t0
        lo, hi = pis[:, 0, 0], pis[:, 1, 0]
        rows.append([name, seconds, float((hi - lo).mean()), float(((y_test >= lo) & (y_test <= hi)).mean()), pis])
        return pis

    try:
        from mapie.regression import CrossConformalRegressor as MapieCrossConformalRegressor
    except ImportError:
        MapieCrossConformalRegressor = None
    if MapieCrossConformalRegressor is not None:
        run(f"MAPIE, {n} exact refits", MapieCrossConformalRegressor)
    run(f"deltagrad-ray, {n} DeltaGrad replays", CrossConformalRegressor)
    run(f"deltagrad-ray, {n} exact retrainings", CrossConformalRegressor, exact=True)

    ref = rows[0][4]
    ref_width = rows[0][2]
    print(f"jackknife+ on diabetes: {n} training rows, {len(X_test)} test rows, "
          f"confidence {args.confidence}, linear model, GD with T = {args.steps}")
    print()
    print("| method | seconds | mean width | coverage | largest end-point difference / mean width |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds, width, coverage, pis in rows:
        diff = float(np.abs(pis - ref).max()) / ref_width
        print(f"| {name} | {seconds:.2f} | {width:.2f} | {coverage:.3f} | {diff:.1e} |")
    if MapieCrossConformalRegressor is None:
        print("\n(MAPIE is not installed: differences are against the first row)")


if __name__ == "__main__":
    main()
