"""Is the replay's error estimate calibrated? Estimate against exact retraining, per request.

    python -m benchmarks.calibration            # the problems of benchmarks.curvature and two more (~10 minutes)
    python -m benchmarks.calibration --quick    # without the 20,000 × 784 problem

For each problem (gradient descent and SGD; logistic regression, least squares, a ReLU MLP; synthetic
data and scikit-learn's bundled sets) and each configuration, 32 leave-one-out requests and three
multi-row deletions (0.1%, 1% and 5% of the rows, at least 2) are replayed as one batch and compared
with batched exact retraining of the same requests. One JSON line per (problem, configuration):

* ``covered``: the share of requests whose ``error_estimate`` ≥ the true ratio
  ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_parent‖ (the target on convex GD problems: ≥ 0.95);
* ``over_median`` / ``over_max``: the median and largest estimate / truth (inf where the estimate is
  inf, i.e. the replay is not certified closer than its parent; or where the truth is exactly 0);
* ``finite``: the share of finite estimates; the same for the absolute estimate (``abs_*``);
* ``truth_median`` / ``truth_max``, ``reliable`` (share) and ``basis``.

See docs/certificate.md for the derivation and the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from deltagrad_ray.core import (DeltaGradConfig, ModelSpec, deltagrad_batched, learning_rates, leave_one_out,
                                make_change_set, retrain_batched, synthetic_classification, synthetic_regression,
                                train)

from .curvature import problems as curvature_problems


def problems(quick: bool):
    """benchmarks.curvature's problems, plus least squares under SGD and the MLP under SGD."""
    yield from curvature_problems(quick)
    d = synthetic_regression(8000, 10, seed=1)
    m = ModelSpec("linear", 10).build()
    yield "synthetic least squares 8000×10, SGD, batch 800", m, d, train(
        m, d, steps=150, lrs=learning_rates(150, 0.1), l2=0.01, batch_size=800, seed=0)
    d = synthetic_classification(4000, 10, 3, seed=1)
    m = ModelSpec("mlp", 10, 3, hidden=(16,)).build()
    yield "MLP 10-16-3 4000 rows, SGD, batch 1000", m, d, train(
        m, d, steps=150, lrs=learning_rates(150, 0.1), l2=0.001, batch_size=1000, seed=0)


CONFIGS = [  # DeltaGradConfig settings; {} is the default (curvature "auto")
    {}, {"curvature": "own", "period": 5}, {"curvature": "own", "period": 10}, {"curvature": "own", "period": 20},
    {"curvature": "secant", "period": 20}, {"schedule": "geometric", "burn_in": 5},
]


def requests(data, model, n_loo: int, seed: int = 2):
    """``n_loo`` leave-one-out requests and three multi-row deletions (0.1%, 1%, 5% of the rows, at least 2)."""
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    changes = leave_one_out(data, data.ids[torch.randperm(n, generator=g)[:n_loo]])
    c = None if model.spec.kind == "linear" else model.spec.n_classes
    for k in sorted({max(2, n // 1000), max(2, n // 100), max(2, n // 20)}):
        changes.append(make_change_set(data, delete_ids=data.ids[torch.randperm(n, generator=g)[:k]], n_classes=c))
    return changes


def _q(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _fmt(x: float) -> float | str:
    return float(f"{x:.3g}") if math.isfinite(x) else "inf"


def measure(name: str, model, data, traj, settings: dict, changes, exact) -> dict:
    cfg = DeltaGradConfig(**settings)
    res = deltagrad_batched(model, traj, data, changes, cfg, batch_size=len(changes))
    dist = (res.params - exact).double().norm(dim=1)
    moved = (exact - traj.final).double().norm(dim=1)
    truth = (dist / moved).tolist()
    est, est_abs = res.error_estimate.tolist(), res.error_absolute.tolist()
    over = [e / t if t > 0 else math.inf for e, t in zip(est, truth)]
    over_abs = [e / t if t > 0 else math.inf for e, t in zip(est_abs, dist.tolist())]
    return {"benchmark": "calibration", "problem": name, "optimizer": "gd" if traj.plan.full_batch else "sgd",
            "model": model.spec.kind, **(settings or {"config": "default"}), "requests": len(changes),
            "covered": round(sum(e >= t for e, t in zip(est, truth)) / len(truth), 3),
            "over_median": _fmt(_q(over, 0.5)), "over_max": _fmt(max(over)),
            "finite": round(sum(math.isfinite(e) for e in est) / len(est), 3),
            "abs_covered": round(sum(e >= t for e, t in zip(est_abs, dist.tolist())) / len(truth), 3),
            "abs_over_median": _fmt(_q(over_abs, 0.5)), "abs_over_max": _fmt(max(over_abs)),
            "truth_median": _fmt(_q(truth, 0.5)), "truth_max": _fmt(max(truth)),
            "estimate_median": _fmt(_q(est, 0.5)),
            "reliable": round(float(res.error_reliable.double().mean()), 3),
            "basis": sorted(set(res.error_basis))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="without the 20,000 × 784 problem")
    ap.add_argument("--requests", type=int, default=32, help="leave-one-out requests per problem")
    args = ap.parse_args(argv)
    for name, model, data, traj in problems(args.quick):
        changes = requests(data, model, args.requests)
        exact = retrain_batched(model, traj, data, changes, batch_size=len(changes))
        for settings in CONFIGS:
            print(json.dumps(measure(name, model, data, traj, settings, changes, exact)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
