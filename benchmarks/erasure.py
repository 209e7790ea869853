"""Fleet erasure: 8 models on overlapping slices of one MNIST-shaped table, one request inbox.

    python -m benchmarks.erasure            # 8 × (10,000 × 784) logistic regression, GD, T = 100
    python -m benchmarks.erasure --quick    # 8 × (2,500 × 784), T = 60

Measured side by side in one run, on fresh copies of the same first versions and the same inbox:

* ``fleet serial``: :func:`~deltagrad_ray.erasure.erase_fleet` with one worker, in this process (what
  one scheduled job does without a cluster): each model's plan, replay, new cache, publish, ledger;
* ``fleet on Ray, 2 workers``: the same fleet as Ray tasks, two at a time (a local Ray started before
  the clock starts; its start-up is reported apart);
* ``exact retraining``: :func:`~deltagrad_ray.api.retrain_exact` of every model without its ids,
  one after another (the models only: no cache written) — what the fleet replaces.

One JSON line per configuration: wall seconds, the ratio to exact retraining, and for the DeltaGrad
rows the largest error ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_first‖ over the 8 published models.

    python -m benchmarks.erasure --job      # what a user runs, end to end, as processes

``--job``: one 60,000 × 784 logistic regression (GD, T = 120) and 100 requests, as a user runs them:
``python -m pipelines.bulk_erasure`` (its defaults: no exact verification; and with ``verify:
{sample: 1}``) against ``deltagrad-ray retrain`` of the same ids, each a fresh process, wall seconds
including start-up, reading, writing and the report; retraining and the job alternate, each the
best of ``--repeats`` processes. Each job line also prints its fixed costs
(``fixed_s``: the wall time minus the replay and its cache write, ``deltagrad_s``) and the
**fixed-cost limit** ``retrain / fixed_s``: the speed-up the job would reach if the replay took no
time at all; ``share_of_limit`` is how much of it the job reaches.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller slices and T (a smoke run)")
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--requests", type=int, default=100, help="requests in the inbox (ids over the whole table)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--job", action="store_true", help="the single-model job end to end against `retrain`")
    ap.add_argument("--rows", type=int, default=None, help="--job: training rows (default 60,000)")
    ap.add_argument("--steps", type=int, default=None, help="--job: T (default 120)")
    ap.add_argument("--no-verify-row", action="store_true", help="--job: leave out the verify-sample-1 run")
    ap.add_argument("--repeats", type=int, default=3, help="--job: each timing is the best of this many processes, "
                    "retraining and the job alternating")
    a = ap.parse_args(argv)
    if a.job:
        return job_vs_retrain(a.quick, a.rows, a.steps, not a.no_verify_row, a.repeats)

    from deltagrad_ray import api
    from deltagrad_ray.core import synthetic_classification
    from deltagrad_ray.erasure import Fleet, LeaseSettings, Registry, Settings, Target, VerifySettings, erase_fleet
    from deltagrad_ray.store import write_dataset

    rows, steps = (2500, 60) if a.quick else (10_000, 100)
    stride = rows * 3 // 4                               # neighbouring slices share a quarter of their rows
    n = stride * (a.models - 1) + rows
    table = synthetic_classification(n, 784, 10, seed=0)
    work = Path(tempfile.mkdtemp(prefix="bench-erasure-"))
    try:
        first: dict[str, object] = {}
        slices: dict[str, tuple[int, int]] = {}
        for k in range(a.models):
            name = f"m{k}"
            lo = k * stride
            slices[name] = (lo, lo + rows)
            write_dataset(table.rows(torch.arange(lo, lo + rows)), work / "data" / f"{name}.parquet")
            first[name] = api.fit(str(work / "data" / f"{name}.parquet"), str(work / "first" / name), model="logreg",
                                  steps=steps, lr=0.5, l2=0.001, n_classes=10)
        ids = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: a.requests].tolist()
        (work / "requests").mkdir()
        (work / "requests" / "batch.jsonl").write_text(
            "\n".join(json.dumps({"request_id": f"r{i}", "data_id": int(d)}) for i, d in enumerate(ids)) + "\n")
        held = {name: sorted(d for d in ids if lo <= d < hi) for name, (lo, hi) in slices.items()}
        shape = {"models": a.models, "rows_per_model": rows, "table_rows": n, "d": 784, "classes": 10, "T": steps,
                 "requests": a.requests, "ids_held_per_model": [len(v) for v in held.values()]}

        t = time.perf_counter()
        exact = {name: api.retrain_exact(first[name], delete=held[name]) for name in first}
        exact_s = time.perf_counter() - t
        emit({"config": "exact retraining, every model", **shape, "seconds": round(exact_s, 2)})

        def fleet(tag: str) -> Fleet:
            targets = []
            for name in first:
                shutil.copytree(work / "first" / name, work / tag / name / "current")
                targets.append(Target(name, str(work / tag / name), str(work / tag / name / "current")))
            return Fleet(str(work / "requests"), tuple(targets), Settings(VerifySettings(sample=0.0),
                                                                          LeaseSettings(ttl_s=600)))

        def error(tag: str) -> float:
            worst = 0.0
            for name in first:
                reg = Registry(work / tag / name)
                got = reg.open(reg.latest()).final
                moved = float((exact[name] - first[name].final).norm())
                worst = max(worst, float((got - exact[name]).norm()) / moved)
            return worst

        serial = fleet("serial")
        t = time.perf_counter()
        res = erase_fleet(serial, workers=1)
        serial_s = time.perf_counter() - t
        assert res.exit_code() == 0, res.summary()
        emit({"config": "fleet serial (one process)", **shape, "seconds": round(serial_s, 2),
              "exact_over_this": round(exact_s / serial_s, 2), "max_error": error("serial")})

        import ray
        t = time.perf_counter()
        ray.init(num_cpus=a.workers, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t
        try:
            on_ray = fleet("ray")
            t = time.perf_counter()
            res = erase_fleet(on_ray, address=None, workers=a.workers)
            ray_s = time.perf_counter() - t
            assert res.exit_code() == 0, res.summary()
            emit({"config": f"fleet on Ray, {a.workers} workers", **shape, "seconds": round(ray_s, 2),
                  "ray_start_s": round(ray_start, 2), "exact_over_this": round(exact_s / ray_s, 2),
                  "serial_over_this": round(serial_s / ray_s, 2), "max_error": error("ray")})
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def job_vs_retrain(quick: bool, rows: int | None = None, steps: int | None = None, verify_row: bool = True,
                   repeats: int = 3) -> int:
    import os
    import subprocess
    import sys

    import yaml

    from deltagrad_ray import api
    from deltagrad_ray.core import synthetic_classification
    from deltagrad_ray.store import write_dataset
    n, T = (12_000, 60) if quick else (60_000, 120)
    n, steps = rows or n, steps or T
    root = Path(__file__).resolve().parents[1]
    work = Path(tempfile.mkdtemp(prefix="bench-erasure-job-"))
    env = {**os.environ, "DELTAGRAD_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}
    try:
        data = synthetic_classification(n, 784, 10, seed=0)
        write_dataset(data, work / "data.parquet")
        # as pipelines.train makes it by default for a local cache: with the memory-mappable feature copy
        # (features_copy), which `retrain` and the job's replay both map instead of decoding Parquet
        api.fit(str(work / "data.parquet"), str(work / "first"), model="logreg", steps=steps, lr=0.5, l2=0.001,
                n_classes=10, mmap_features=True)
        ids = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:100].tolist()
        (work / "ids.txt").write_text("\n".join(map(str, ids)) + "\n")
        shape = {"n": n, "d": 784, "classes": 10, "T": steps, "requests": len(ids)}

        def timed(args: list[str]) -> tuple[float, str]:
            t = time.perf_counter()
            p = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
            assert p.returncode == 0, p.stderr[-2000:]
            return time.perf_counter() - t, p.stdout

        def retrain() -> float:
            return timed([sys.executable, "-m", "deltagrad_ray.cli", "retrain", "--cache", str(work / "first"),
                          "--delete", str(work / "ids.txt"), "--out", str(work / "retrained.safetensors"),
                          "--overwrite"])[0]

        def job(tag: str, verify: dict) -> tuple[float, dict, dict]:
            """One run of the job on a fresh copy of the first version and a fresh inbox."""
            out = work / tag.replace(" ", "-")
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / "requests", ignore_errors=True)
            shutil.copytree(work / "first", out / "current")
            (work / "requests").mkdir()
            (work / "requests" / "batch.jsonl").write_text(
                "\n".join(json.dumps({"request_id": f"r{i}", "data_id": d}) for i, d in enumerate(ids)) + "\n")
            cfg = work / f"{tag.replace(' ', '-')}.yaml"
            cfg.write_text(yaml.safe_dump({"cache": str(out / "current"), "output": str(out),
                                           "requests": str(work / "requests"), "verify": verify,
                                           "report": {"output": str(work / "reports")}}))
            seconds, stdout = timed([sys.executable, "-m", "pipelines.bulk_erasure", "--config", str(cfg)])
            line = json.loads(stdout.strip().splitlines()[-1])
            audit = json.loads(next((out / "audit").glob("*.json")).read_text())
            return seconds, line, audit

        # retraining and the job alternate (retrain, job, retrain, job, ...), each timed as the best of
        # `repeats` whole processes: this machine drifts by ±8% over minutes, and a baseline timed once,
        # minutes before, skews every ratio after it
        runs = [("defaults", {"sample": 0})] + ([("verify sample 1", {"sample": 1})] if verify_row else [])
        retrain_s, best = float("inf"), {}
        for _ in range(repeats):
            for tag, verify in runs:
                retrain_s = min(retrain_s, retrain())
                got = job(tag, verify)
                if tag not in best or got[0] < best[tag][0]:
                    best[tag] = got
        emit({"config": "deltagrad-ray retrain", **shape, "seconds": round(retrain_s, 2), "repeats": repeats})
        for tag, _ in runs:
            seconds, line, audit = best[tag]
            cert = audit.get("certificate") or {}
            # the fixed-cost limit: the speed-up this job would have if the replay (and writing its cache)
            # took no time at all — start-up, planning, reading the data, publishing, the report remain
            fixed_s = seconds - audit["timings"]["deltagrad_s"]
            emit({"config": f"pipelines.bulk_erasure ({tag})", **shape, "seconds": round(seconds, 2),
                  "repeats": repeats, "retrain_over_this": round(retrain_s / seconds, 2), "applied": line["applied"],
                  "deltagrad_s": round(audit["timings"]["deltagrad_s"], 2), "fixed_s": round(fixed_s, 2),
                  "fixed_cost_limit": round(retrain_s / fixed_s, 2),
                  "share_of_limit": round((retrain_s / seconds) / (retrain_s / fixed_s), 2),
                  "published": (audit.get("new") or {}).get("method"),
                  "reconciled": cert.get("reconciled"),
                  "error_estimate": cert.get("replay_estimate", cert.get("error_estimate")),
                  "verified_ratio": (audit.get("verification") or {}).get("ratio")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
