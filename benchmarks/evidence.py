"""What a leave-one-out run's evidence costs and shows: per-request error estimates, --verify 59 and
--exact-above 0.01, against exact retraining of every request.

    python -m benchmarks.evidence            # 6 problems, 200 leave-one-out requests each (~5 minutes)
    python -m benchmarks.evidence --quick    # 60 requests each

One JSON line per problem, all through ``many.loo`` (what ``deltagrad-ray loo`` runs), serial backend:

* ``loo_s``: the plain run; ``covered``: the share of requests whose ``error_estimate`` ≥ the true ratio
  ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_full‖ (inf counts as covered); ``finite``: the share of finite
  estimates; ``truth_max``;
* ``verify59_s`` and ``verify59_cost``: the run with ``verify=59``, and its extra seconds as a fraction
  of the plain run; ``bound`` (95% of requests at 95% confidence) and ``bound_holds``: the share of all
  requests within it (the rule promises ≥ 0.95 with probability ≥ 0.95);
* ``exact_above_s``, ``reran``: the run with ``exact_above=0.01``, how many requests it retrained, and
  ``after_max``: the largest true error afterwards (≤ 0.01 wherever the estimate covered the truth).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch

from deltagrad_ray import api, many
from deltagrad_ray.core import synthetic_classification, synthetic_regression
from deltagrad_ray.core.replay import retrain_batched
from deltagrad_ray.core.requests import leave_one_out
from deltagrad_ray.datasets import sklearn_dataset, train_test_split
from deltagrad_ray.store import open_cache


def problems():
    """(name, data, fit settings): convex GD and SGD, scikit-learn's bundled sets, an MLP."""
    yield "synthetic logreg 8000×10, GD", synthetic_classification(8000, 10, 4, seed=1), \
        {"model": "logreg", "steps": 150, "lr": 0.5, "l2": 0.01}
    yield "synthetic logreg 8000×10, SGD 800", synthetic_classification(8000, 10, 4, seed=1), \
        {"model": "logreg", "optimizer": "sgd", "batch_size": 800, "steps": 150, "lr": 0.5, "l2": 0.01}
    yield "synthetic least squares 8000×10, GD", synthetic_regression(8000, 10, seed=1), \
        {"model": "linear", "steps": 150, "lr": 0.5, "l2": 0.01}
    yield "diabetes least squares, GD", train_test_split(sklearn_dataset("diabetes"), 342)[0], \
        {"model": "linear", "steps": 200, "lr": 0.1, "l2": 0.001}
    yield "breast cancer logreg, GD", train_test_split(sklearn_dataset("breast_cancer"), 400)[0], \
        {"model": "logreg", "steps": 100, "lr": 0.5, "l2": 0.001}
    yield "MLP 10-16-3 4000 rows, GD", synthetic_classification(4000, 10, 3, seed=1), \
        {"model": "mlp", "hidden": (16,), "steps": 150, "lr": 0.3, "l2": 0.001}


def _timed(*args, **kwargs):
    """many.loo(*args, **kwargs) and its seconds."""
    t0 = time.perf_counter()
    out = many.loo(*args, **kwargs)
    return out, time.perf_counter() - t0


def _r(x: float) -> float | str:
    return float(f"{x:.3g}") if math.isfinite(x) else "inf"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    n_req = 60 if a.quick else 200
    with tempfile.TemporaryDirectory(prefix="evidence-") as tmp:
        for k, (name, data, settings) in enumerate(problems()):
            root = f"{tmp}/c{k}"
            api.fit(data, root, **settings)
            c = open_cache(root)
            ds = c.data()
            g = torch.Generator().manual_seed(0)
            ids = ds.ids[torch.randperm(len(ds), generator=g)[:n_req]]
            exact = retrain_batched(c.model, c.trajectory(), ds, leave_one_out(ds, ids))
            moved = (exact - c.final).norm(dim=1)
            fan = many.Fanout(batch_size=32)
            plain, loo_s = _timed(c, ids, fanout=fan)
            truth = (plain.params - exact).norm(dim=1) / moved
            est = plain.error_estimate
            verified, v_s = _timed(c, ids, fanout=fan, verify=59, seed=1)
            v = verified.verification
            fixed, e_s = _timed(c, ids, fanout=fan, exact_above=0.01)
            after = (fixed.params - exact).norm(dim=1) / moved
            print(json.dumps({
                "problem": name, "requests": n_req, "loo_s": round(loo_s, 2),
                "covered": round(float((est >= truth).double().mean()), 3),
                "finite": round(float(est.isfinite().double().mean()), 3),
                "estimate_median": _r(float(est.median())), "truth_median": _r(float(truth.median())),
                "truth_max": _r(float(truth.max())), "reliable": bool(plain.replay.stats["error_reliable"].all()),
                "verify59_s": round(v_s, 2), "verify59_cost": round((v_s - loo_s) / loo_s, 2),
                "bound": _r(v.bound), "bound_holds": round(float((truth <= v.bound).double().mean()), 3),
                "exact_above_s": round(e_s, 2), "reran": fixed.method.count("exact"),
                "after_max": _r(float(after.max()))}), flush=True)


if __name__ == "__main__":
    main()
