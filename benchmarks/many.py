"""Leave-one-out over many ids: exact retraining vs single-request vs batched DeltaGrad.

    python -m benchmarks.many            # 60,000 × 784 logistic regression, GD, T = 120
    python -m benchmarks.many --quick    # 12,000 × 784, T = 60

One JSON line per configuration with the time per request, measured in one run:
(a) exact retraining (a few requests, timed, scaled per request); (b) single-request DeltaGrad
(a few); (c) batched DeltaGrad with B ∈ {8, 32, 128} over ``--requests`` LOO ids (in the data's
precision, and with float32 difference-form GEMMs). Also the GFLOP/s of the batched explicit
step (two GEMMs of 2·n·d·B·c flops each) beside this machine's matmul peak measured in the
same run (best of several 4096² products in the same dtype).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from deltagrad_ray.core import (DeltaGradConfig, Replay, ModelSpec, deltagrad, deltagrad_batched,
                                learning_rates, leave_one_out, retrain, synthetic_classification, train)


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=None, help="LOO ids replayed in batches (default 1000; quick 64)")
    ap.add_argument("--batch-sizes", default="8,32,128")
    args = ap.parse_args(argv)
    n, steps = (12_000, 60) if args.quick else (60_000, 120)
    requests = args.requests or (64 if args.quick else 1000)
    d, c = 784, 10
    data = synthetic_classification(n, d, c, seed=0)
    model = ModelSpec("logreg", d, c).build()
    traj = train(model, data, steps=steps, lrs=learning_rates(steps, 0.1), l2=0.005)
    cfg = DeltaGradConfig(period=5, burn_in=10, history=2)
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:requests]
    changes = leave_one_out(data, ids)
    base = {"benchmark": "many", "n": n, "d": d, "classes": c, "steps": steps, "dtype": "float64"}

    k = 2
    t0 = time.perf_counter()
    exact = [retrain(model, traj, data, ch) for ch in changes[:k]]
    exact_per = (time.perf_counter() - t0) / k
    emit({**base, "method": "exact retraining", "timed_requests": k, "seconds_per_request": round(exact_per, 3)})

    k = 3
    t0 = time.perf_counter()
    singles = [deltagrad(model, traj, data, ch, cfg) for ch in changes[:k]]
    single_per = (time.perf_counter() - t0) / k
    emit({**base, "method": "deltagrad, one request at a time", "timed_requests": k,
          "seconds_per_request": round(single_per, 3), "vs_exact": round(exact_per / single_per, 2),
          "dist_to_exact_over_deletion_effect": max(float((s.params - e).norm() / (e - traj.final).norm())
                                                    for s, e in zip(singles, exact))})

    peaks = {torch.float64: matmul_peak(torch.float64), torch.float32: matmul_peak(torch.float32)}
    for B in (int(x) for x in args.batch_sizes.split(",")):
        for gemm in (None, torch.float32):
            t0 = time.perf_counter()
            res = deltagrad_batched(model, traj, data, changes, cfg, batch_size=B, gemm_dtype=gemm,
                                    batches_per_pass=1)
            per = (time.perf_counter() - t0) / len(changes)
            # the explicit-step kernel alone, timed on one batch at a mid-run point
            rp = Replay(model, traj, data, changes[:B], cfg, gemm_dtype=gemm)
            seg = next(traj.segments(steps // 2, steps // 2 + 1))
            W = res.params[:B]
            sb = rp.index.at(steps // 2)
            base, weights = rp.index.base(sb)
            rp.rows.grad_many(W, base, weights, sb.extra, seg.params[0])
            t1 = time.perf_counter()
            rp.rows.grad_many(W, base, weights, sb.extra, seg.params[0])
            kernel_s = time.perf_counter() - t1
            gflops = 4 * n * d * B * c / kernel_s / 1e9
            peak = peaks[gemm or torch.float64]
            err = max(float((res.params[i] - e).norm() / (e - traj.final).norm()) for i, e in enumerate(exact))
            emit({**base, "method": "deltagrad, batched", "B": B,
                  "gemm_dtype": "float32 (difference form)" if gemm else "float64",
                  "requests": len(changes), "seconds_per_request": round(per, 4),
                  "vs_single": round(single_per / per, 2), "vs_exact": round(exact_per / per, 2),
                  "explicit_step_gflops": round(gflops, 1), "matmul_peak_gflops": round(peak, 1),
                  "explicit_vs_peak": round(gflops / peak, 3), "fallbacks": int(res.fallbacks.sum()),
                  "dist_to_exact_over_deletion_effect": err})
    return 0


if __name__ == "__main__":
    sys.exit(main())
