"""The main job on embedded defaults (README, first command).

On a local Ray and a local directory: make the data → train (an MNIST-shaped logistic
regression, published as version 0, and a least-squares model of scikit-learn's diabetes data)
→ bulk erasure of a batch of requests (some of them invalid on purpose) with DeltaGrad →
verification against exact retraining → jackknife+ prediction intervals and jackknife/influence
from DeltaGrad leave-one-out models fanned out on Ray → a report. It runs the jobs of
:mod:`deltagrad_ray.jobs` with their local defaults (built in code, the same as
``pipelines/configs/``), rooted under the output directory.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable

import torch

from .datasets import make_dataset, sklearn_dataset, train_test_split
from .jobs.config import check, merged
from .store.datasets import write_dataset
from .store.location import location


def _config(name: str, root: str, **overrides) -> dict:
    """A job's local defaults with every location under ``root``, overridden and validated."""
    job = importlib.import_module(f".jobs.{name}", __package__)
    return check(merged(job.defaults(root.rstrip("/")), overrides), job.SCHEMA)


def _run(name: str, cfg: dict) -> dict:
    return importlib.import_module(f".jobs.{name}", __package__).run(cfg)


def _requests(path, ids: torch.Tensor, unknown_id: int) -> int:
    """JSONL erasure requests for ``ids``, plus a malformed row, an unknown id and a duplicate."""
    lines = [json.dumps({"request_id": f"req-{i:05d}", "data_id": int(d), "timestamp": "2026-11-22T09:00:00Z"})
             for i, d in enumerate(ids.tolist())]
    lines += ['{"request_id": "req-bad-json", "data_id": ',                        # cut off
              json.dumps({"request_id": "req-unknown", "data_id": unknown_id}),   # not in the data
              json.dumps({"request_id": "req-00000", "data_id": int(ids[0])}),    # duplicate request
              json.dumps({"request_id": "req-text-id", "data_id": "seven"})]      # not an integer
    location(path).write_text("\n".join(lines) + "\n")
    return len(lines)


def run_demo(out: str = "demo-output", *, n: int = 20_000, d: int = 784, steps: int = 120,
             emit: Callable[[dict], None] = print) -> dict:
    t0 = time.perf_counter()
    root = location(out).uri
    # -- data ------------------------------------------------------------------------------------
    mnist = make_dataset("classification", n=n, d=d, n_classes=10, seed=0)
    write_dataset(mnist, location(root).join("data", "mnist.parquet"), overwrite=True)
    train_rows, test_rows = train_test_split(sklearn_dataset("diabetes"), 342)
    write_dataset(train_rows, location(root).join("data", "diabetes-train.parquet"), overwrite=True)
    write_dataset(test_rows, location(root).join("data", "diabetes-test.parquet"), overwrite=True)
    emit({"stage": "data", "mnist_shaped": [n, d], "diabetes": [342, len(test_rows)], "location": root})

    # -- train: the MNIST-shaped model (default config) and the diabetes model -------------------
    for existing in ("models/current", "models/diabetes"):
        if location(root).join(existing, "manifest.json").exists():
            raise FileExistsError(f"{root}/{existing} already holds a cache; choose a new --out")
    trained = _run("train", _config("train", root, optimizer={"steps": steps}))
    emit({"stage": "train", **trained})
    trained_diabetes = _run("train", _config("train", root, data=f"{root}/data/diabetes-train.parquet",
                                             cache=f"{root}/models/diabetes", publish=None, model={"kind": "linear"},
                                             optimizer={"steps": 200, "lr": 0.1, "l2": 0.001}))
    emit({"stage": "train", **trained_diabetes})

    # -- bulk erasure of 1% of the MNIST-shaped rows, verified against exact retraining ----------
    ids = mnist.ids[torch.randperm(n, generator=torch.Generator().manual_seed(1))[: n // 100]]
    received = _requests(location(root).join("erasure", "requests", "batch-0001.jsonl"), ids, unknown_id=10 * n)
    # the demo checks itself: this run is also retrained exactly (the job's default samples none)
    erasure = _run("bulk_erasure", _config("bulk_erasure", root, verify={"sample": 1, "tolerance": 0.05}))
    emit({"stage": "bulk_erasure", "received": received, **erasure})

    # -- jackknife+ intervals, jackknife and influence: LOO models on a local Ray -----------------
    conformal = _run("conformal", _config("conformal", root))
    emit({"stage": "conformal", **conformal})
    jackknife = _run("jackknife", _config("jackknife", root))
    emit({"stage": "jackknife", **jackknife})

    # -- the report index -----------------------------------------------------------------------
    audits = location(root).join("models", "audit").list()
    audit = json.loads(audits[0].read_text()) if audits else {}
    ver = audit.get("verification") or {}
    cert = audit.get("certificate") or {}
    timings = audit.get("timings") or {}
    # the update itself (replay and writing the new cache) against the exact retraining of the same
    # ids; the job's whole run also pays for reading the data, planning and this verification
    speedup = (timings.get("exact_s") or 0) / max(timings.get("deltagrad_s") or 0, 1e-9)
    estimate = cert.get("replay_estimate", cert.get("error_estimate"))
    estimate_text = f"{estimate:.2g}" if isinstance(estimate, (int, float)) else "none (not certified)"
    lines = [
        "# deltagrad-ray demo", "",
        f"Everything below ran on this machine in {time.perf_counter() - t0:.0f} s, on a local Ray.", "",
        "| step | result | report |", "| --- | --- | --- |",
        f"| train | MNIST-shaped logistic regression, {n:,} × {d}, {steps} GD steps, cache "
        f"{trained['cache_mb']} MB | {_rel(trained.get('report'), root)} |",
        f"| train | diabetes least squares, 342 rows | {_rel(trained_diabetes.get('report'), root)} |",
        f"| bulk erasure | {erasure['applied']} requests applied, {erasure['rejected']} rejected; "
        f"certificate: error estimate {estimate_text} of the erasure's effect; measured against exact "
        f"retraining (the demo verifies this run): {ver.get('ratio', float('nan')):.2g}; the update "
        f"(replay + new cache, {timings.get('deltagrad_s') or float('nan'):.1f} s) {speedup:.1f}× faster "
        f"than retraining ({timings.get('exact_s') or float('nan'):.1f} s); whole run "
        f"{timings.get('run_s') or float('nan'):.1f} s including that verification | "
        f"{_rel(erasure.get('report'), root)} |",
        f"| jackknife+ (diabetes) | coverage {conformal.get('coverage', float('nan')):.3f} at α = "
        f"{conformal['alpha']}, mean width {conformal.get('mean_width', float('nan')):.1f} | "
        f"{_rel(conformal.get('report'), root)} |",
        f"| jackknife (diabetes) | test loss {jackknife['test_loss']:.1f} ± {jackknife['test_loss_se']:.1f} "
        f"(jackknife SE) | {_rel(jackknife.get('report'), root)} |",
    ]
    index = location(root).join("reports", "index.md")
    index.write_text("\n".join(lines) + "\n", overwrite=True)
    return {"stage": "done", "seconds": round(time.perf_counter() - t0, 1), "report": index.uri,
            "erasure_ratio_vs_exact": ver.get("ratio"), "erasure_error_estimate": estimate,
            "coverage": conformal.get("coverage")}


def _rel(path: str | None, root: str) -> str:
    """A link from reports/index.md to another report in reports/."""
    if not path:
        return "—"
    folder = path.rstrip("/").split("/")[-2]
    return f"[{folder}]({folder}/report.md)"
