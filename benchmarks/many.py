"""Many LOO requests: DeltaGrad (own, own+path, secant and shared curvature) against exact retraining done
one request at a time *and* batched the same way (B models per GEMM pass, the same kernel).

    python -m benchmarks.many            # 60,000 × 784 logistic regression, GD, T = 120
    python -m benchmarks.many --quick    # 12,000 × 784, T = 60

One JSON line per configuration, all measured in one run on the same trajectory:

* ``exact, one at a time``: :func:`~deltagrad_ray.core.retrain` of one request (timed), per request;
* ``exact, batched``: :func:`~deltagrad_ray.core.retrain_batched` of the first batch of B requests
  — the honest baseline: a careful user batches exact retraining too. Its models are the ground
  truth of every error below;
* DeltaGrad, batched (B requests per pass) for each curvature, period T0 and burn-in j0, over
  ``--requests`` LOO ids: seconds per request, against both exact rows, with the median and max
  error ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_full‖ over the first batch's requests.

Also the GFLOP/s of the batched explicit step beside this machine's matmul peak (same dtype, same run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from deltagrad_ray.core import (DeltaGradConfig, ModelSpec, Replay, deltagrad_batched, learning_rates,
                                leave_one_out, relative_error, retrain, retrain_batched, speedup_bound,
                                synthetic_classification, train)


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def matmul_peak(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    A = torch.randn(size, size, dtype=dtype)
    B = torch.randn(size, size, dtype=dtype)
    torch.mm(A, B)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(A, B)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


CONFIGS = [  # (curvature, T0, j0, extra settings)
    ("own", 5, 10, {}), ("own", 10, 10, {}), ("own", 20, 10, {}),
    ("own+path", 5, 10, {}), ("own+path", 10, 10, {}), ("own+path", 20, 10, {}),
    ("secant", 5, 10, {}), ("secant", 10, 10, {}), ("secant", 20, 10, {}), ("secant", 40, 10, {}),
    ("shared", 5, 10, {}), ("shared", 10, 10, {}), ("shared", 20, 10, {}), ("shared", 40, 10, {}),
    ("shared", 20, 4, {}), ("shared", 40, 4, {}), ("shared", 60, 2, {}),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=None, help="LOO ids replayed (default 64; quick 32)")
    ap.add_argument("--batch-size", type=int, default=32, help="B, requests per pass (DeltaGrad and batched exact)")
    ap.add_argument("--only", default=None, help="comma-separated curvatures to run (default: all)")
    args = ap.parse_args(argv)
    n, steps = (12_000, 60) if args.quick else (60_000, 120)
    requests = args.requests or (32 if args.quick else 64)
    B = args.batch_size
    d, c = 784, 10
    data = synthetic_classification(n, d, c, seed=0)
    model = ModelSpec("logreg", d, c).build()
    traj = train(model, data, steps=steps, lrs=learning_rates(steps, 0.1), l2=0.005)
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:requests]
    changes = leave_one_out(data, ids)
    base = {"benchmark": "many", "n": n, "d": d, "classes": c, "steps": steps, "dtype": "float64", "B": B}

    t0 = time.perf_counter()
    retrain(model, traj, data, changes[0])
    single_exact = time.perf_counter() - t0
    emit({**base, "method": "exact, one at a time", "timed_requests": 1, "seconds_per_request": round(single_exact, 3)})
    t0 = time.perf_counter()
    exact = retrain_batched(model, traj, data, changes[:B], batch_size=B)
    batched_exact = (time.perf_counter() - t0) / len(exact)
    emit({**base, "method": "exact, batched", "timed_requests": len(exact),
          "seconds_per_request": round(batched_exact, 4),
          "vs_exact_one_at_a_time": round(single_exact / batched_exact, 2)})

    peak = matmul_peak(torch.float64)
    rp = Replay(model, traj, data, changes[:B])
    seg = next(traj.segments(steps // 2, steps // 2 + 1))
    sb = rp.index.at(steps // 2)
    base_rows, weights = rp.index.base(sb)
    W = exact.clone()
    rp.rows.grad_many(W, base_rows, weights, sb.extra, seg.params[0])
    t1 = time.perf_counter()
    rp.rows.grad_many(W, base_rows, weights, sb.extra, seg.params[0])
    gflops = 4 * n * d * W.shape[0] * c / (time.perf_counter() - t1) / 1e9
    emit({**base, "method": "explicit-step kernel", "gflops": round(gflops, 1), "matmul_peak_gflops": round(peak, 1),
          "vs_peak": round(gflops / peak, 3)})

    only = set(args.only.split(",")) if args.only else None
    for curvature, T0, j0, extra in CONFIGS:
        if only is not None and curvature not in only:
            continue
        cfg = DeltaGradConfig(period=T0, burn_in=j0, curvature=curvature, **extra)
        t0 = time.perf_counter()
        res = deltagrad_batched(model, traj, data, changes, cfg, batch_size=B, batches_per_pass=1)
        per = (time.perf_counter() - t0) / len(changes)
        errs = sorted(relative_error(res.params[i], exact[i], traj.final) for i in range(len(exact)))
        emit({**base, "method": "deltagrad, batched", "curvature": curvature, "T0": T0, "j0": j0, **extra,
              "requests": len(changes), "seconds_per_request": round(per, 4),
              "vs_exact_batched": round(batched_exact / per, 2), "vs_exact_one_at_a_time": round(single_exact / per, 2),
              "bound": round(speedup_bound(cfg.explicit_steps(steps)), 2),
              "error_median": float(f"{errs[len(errs) // 2]:.3g}"), "error_max": float(f"{errs[-1]:.3g}"),
              "fallbacks": int(res.fallbacks.sum())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
