"""A chain of scheduled erasures under the default policy, against exact retraining after every run.

    python -m benchmarks.chain            # 20,000 × 784 GD logistic regression, T = 120, 20 runs of 5 requests
    python -m benchmarks.chain --quick    # 4,000 × 100, 8 runs

Each run is the bulk-erasure job with its default settings (``verify.sample`` 0, ``reconcile``
``{max_drift: 0.05, every_versions: 10}``), in process. After each run the published model is
compared with exact retraining of the first model without every id erased so far. One JSON line
per run: ``true_error`` = ‖θ_published − θ_exact‖ / ‖θ_exact − θ_first‖ (relative to the whole
chain's effect); the version's ``method`` (deltagrad, or exact when the policy reconciled) and its
certificate: ``drift_estimate`` (the chain's estimate since the last exact version, relative to its
effect since then), and ``drift_vs_first``, the same absolute drift relative to the whole chain's
effect (what ``true_error`` measures); ``covered``: the absolute drift estimate ≥ the true
absolute error ‖θ_published − θ_exact‖ (``drift_abs``, ``true_abs``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import time

import torch


def _g(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.3g}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--per-run", type=int, default=5)
    a = ap.parse_args(argv)
    os.environ.setdefault("DELTAGRAD_NO_PROGRESS", "1")
    from deltagrad_ray import api
    from deltagrad_ray.core import synthetic_classification
    from deltagrad_ray.jobs import bulk_erasure
    from deltagrad_ray.jobs.config import check
    from deltagrad_ray.store import write_dataset
    from deltagrad_ray.store.registry import Registry

    n, d, steps, runs = (4000, 100, 60, 8) if a.quick else (20_000, 784, 120, 20)
    runs = a.runs or runs
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-chain-"))
    try:
        data = synthetic_classification(n, d, 10, seed=0)
        write_dataset(data, work / "data.parquet")
        first = api.fit(str(work / "data.parquet"), str(work / "first"), model="logreg", steps=steps, lr=0.5,
                        l2=0.001, n_classes=10, mmap_features=True)   # as pipelines.train makes it
        shutil.copytree(work / "first", work / "models" / "current")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
        cfg = check({"cache": str(work / "models" / "current"), "output": str(work / "models"),
                     "requests": str(work / "requests"), "ray": {"address": None}}, bulk_erasure.SCHEMA)
        reg = Registry(str(work / "models"))
        erased: list[int] = []
        for k in range(runs):
            batch = [int(data.ids[i]) for i in order[k * a.per_run:(k + 1) * a.per_run]]
            (work / "requests").mkdir(exist_ok=True)
            (work / "requests" / f"run-{k:03d}.jsonl").write_text(
                "\n".join(json.dumps({"request_id": f"r{k}-{j}", "data_id": i}) for j, i in enumerate(batch)) + "\n")
            t0 = time.perf_counter()
            out = bulk_erasure.run(cfg)
            seconds = time.perf_counter() - t0
            erased += batch
            rec = reg.latest()
            published = reg.open(rec).final.double()
            exact = api.retrain_exact(first, delete=erased).double()
            effect = float((exact - first.final.double()).norm())
            true = float((published - exact).norm()) / effect
            cert = rec.certificate or {}
            drift_abs = cert.get("drift_absolute")
            if rec.method == "exact":
                drift_abs = 0.0
            vs_first = None if drift_abs is None else drift_abs / max(effect - drift_abs, 1e-300)
            true_abs = float((published - exact).norm())
            print(json.dumps({"run": k + 1, "version": rec.version, "erased": len(erased),
                              "applied": out.get("applied"), "seconds": round(seconds, 2), "method": rec.method,
                              "true_error": float(f"{true:.3g}"), "drift_estimate": _g(cert.get("drift_estimate")),
                              "drift_vs_first": None if vs_first is None else float(f"{vs_first:.3g}"),
                              "true_abs": float(f"{true_abs:.3g}"),
                              "drift_abs": None if drift_abs is None else float(f"{drift_abs:.3g}"),
                              "covered": None if drift_abs is None else drift_abs >= true_abs}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
