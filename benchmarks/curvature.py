"""Which curvature model, at which period: accuracy of batched LOO replays on several problems.

    python -m benchmarks.curvature            # eight problems (six GD convex, one SGD, one MLP), ~5 minutes
    python -m benchmarks.curvature --quick    # without the 20,000 × 784 problem

For each problem, 32 leave-one-out requests are replayed as one batch with each configuration and
compared with batched exact retraining of the same requests: one JSON line per (problem,
configuration) with the median and max error ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_full‖ over the 32 and
the mean number of explicit steps. This is the measurement behind ``curvature="auto"``
(README, "Curvature"); times are in ``benchmarks.many``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from deltagrad_ray.core import (DeltaGradConfig, ModelSpec, deltagrad_batched, learning_rates, leave_one_out,
                                relative_error, retrain_batched, synthetic_classification, synthetic_regression,
                                train)
from deltagrad_ray.datasets import sklearn_dataset, train_test_split


def problems(quick: bool):
    """(name, model, data, trajectory): the test suite's shapes, scikit-learn's bundled sets, MNIST-shaped."""
    d = synthetic_classification(8000, 10, 4, seed=1)
    m = ModelSpec("logreg", 10, 4).build()
    yield "synthetic logreg 8000×10, GD", m, d, train(m, d, steps=150, lrs=learning_rates(150, 0.5), l2=0.01)
    d = synthetic_regression(8000, 10, seed=1)
    m = ModelSpec("linear", 10).build()
    yield "synthetic least squares 8000×10, GD", m, d, train(m, d, steps=150, lrs=learning_rates(150, 0.5), l2=0.01)
    tr, _ = train_test_split(sklearn_dataset("diabetes"), 342)
    m = ModelSpec("linear", 10).build()
    yield "diabetes least squares, GD", m, tr, train(m, tr, steps=200, lrs=learning_rates(200, 0.1), l2=0.001)
    tr, _ = train_test_split(sklearn_dataset("breast_cancer"), 400)
    m = ModelSpec("logreg", 30, 2).build()
    yield "breast cancer logreg, GD", m, tr, train(m, tr, steps=100, lrs=learning_rates(100, 0.5), l2=0.001)
    tr, _ = train_test_split(sklearn_dataset("digits"), 1500)
    m = ModelSpec("logreg", 64, 10).build()
    yield "digits logreg, GD", m, tr, train(m, tr, steps=150, lrs=learning_rates(150, 0.2), l2=0.001)
    if not quick:
        d = synthetic_classification(20_000, 784, 10, seed=0)
        m = ModelSpec("logreg", 784, 10).build()
        yield "MNIST-shaped logreg 20000×784, GD", m, d, train(m, d, steps=120, lrs=learning_rates(120, 0.1),
                                                                l2=0.005)
    d = synthetic_classification(8000, 10, 4, seed=1)
    m = ModelSpec("logreg", 10, 4).build()
    yield "synthetic logreg 8000×10, SGD, batch 800", m, d, train(m, d, steps=150, lrs=learning_rates(150, 0.5),
                                                                  l2=0.01, batch_size=800, seed=0)
    d = synthetic_classification(4000, 10, 3, seed=1)
    m = ModelSpec("mlp", 10, 3, hidden=(16,)).build()
    yield "MLP 10-16-3 4000 rows, GD", m, d, train(m, d, steps=150, lrs=learning_rates(150, 0.3), l2=0.001)


CONFIGS = [  # DeltaGradConfig settings (burn-in j0 = 10, m = 2 throughout)
    {"curvature": "own", "period": 5}, {"curvature": "own", "period": 10},
    {"curvature": "secant", "period": 5}, {"curvature": "secant", "period": 10}, {"curvature": "secant", "period": 20},
    {"curvature": "shared", "period": 10}, {"curvature": "shared", "period": 20},
    {"curvature": "own+path", "period": 10},
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="without the 20,000 × 784 problem")
    ap.add_argument("--requests", type=int, default=32, help="LOO requests per problem (one batch)")
    args = ap.parse_args(argv)
    for name, model, data, traj in problems(args.quick):
        ids = data.ids[torch.randperm(len(data), generator=torch.Generator().manual_seed(2))[:args.requests]]
        changes = leave_one_out(data, ids)
        exact = retrain_batched(model, traj, data, changes, batch_size=len(changes))
        for settings in CONFIGS:
            if settings["curvature"] == "own+path" and not traj.plan.full_batch:
                continue  # refused for SGD: the path's pairs mix mini-batches
            cfg = DeltaGradConfig(burn_in=10, history=2, **settings)
            res = deltagrad_batched(model, traj, data, changes, cfg, batch_size=len(changes))
            errs = sorted(relative_error(res.params[b], exact[b], traj.final) for b in range(len(changes)))
            print(json.dumps({"benchmark": "curvature", "problem": name, **settings,
                              "default": cfg.curvature == DeltaGradConfig().resolve(
                                  full_batch=traj.plan.full_batch, kind=model.spec.kind).curvature
                              and cfg.period == DeltaGradConfig().resolve(
                                  full_batch=traj.plan.full_batch, kind=model.spec.kind).period,
                              "error_median": float(f"{errs[len(errs) // 2]:.3g}"),
                              "error_max": float(f"{errs[-1]:.3g}"),
                              "explicit_steps": float(res.explicit_steps.double().mean()),
                              "fallbacks": int(res.fallbacks.sum())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
