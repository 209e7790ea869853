"""Jackknife+ / CV+ prediction intervals or sets from DeltaGrad refits, fanned out on Ray.

``cache`` is a trajectory cache or a models prefix whose published version (``LATEST.json``)
is used.
"""

from __future__ import annotations

from .config import RAY, REQUIRED, S3, fanout, report_target

SCHEMA = {"cache": REQUIRED, "test": REQUIRED, "output": REQUIRED, "alpha": 0.1, "method": "jackknife+",
          "folds": 10, "ray": dict(RAY), "report": None, "s3": dict(S3)}


def defaults(root: str = "demo-output") -> dict:
    """The local defaults (``pipelines/configs/conformal.yaml``): jackknife+ intervals for the
    diabetes test set, on a local Ray."""
    return {"cache": f"{root}/models/diabetes", "test": f"{root}/data/diabetes-test.parquet",
            "output": f"{root}/results/conformal", "alpha": 0.1, "method": "jackknife+", "folds": 10,
            "ray": {"address": None, "workers": 2, "num_cpus": 1, "num_gpus": 0, "mode": "auto", "strategy": "SPREAD",
                    "batch_size": 64},
            "report": f"{root}/reports"}


def run(cfg: dict) -> dict:
    from .. import many
    from ..store.registry import open_resolved
    from ..report import Report, bars, histogram, intervals
    from ..results import estimate_summary, write_table
    from ..store import location

    cache = open_resolved(cfg["cache"])
    out_loc = location(cfg["output"])
    fan = fanout(cfg["ray"], parts=out_loc.join("models.parts").uri)
    r = many.conformal(cache, cfg["test"], float(cfg["alpha"]), method=cfg["method"], folds=int(cfg["folds"]),
                       fanout=fan)
    fan.progress.close()
    cols = {"id": r["ids"], "prediction": r["prediction"]}
    if "sets" in r:
        cols["set"] = [[int(i) for i in row.nonzero().reshape(-1)] for row in r["sets"]]
    else:
        cols["lower"], cols["upper"] = r["lower"], r["upper"]
    out = {"pipeline": "conformal", "method": r["method"], "alpha": r["alpha"], "models": r["n_models"],
           "output": out_loc.join("conformal.parquet").uri,
           **{k: r[k] for k in ("mean_width", "mean_set_size", "coverage") if k in r},
           **estimate_summary(r["replay"].stats.get("error_estimate"), r["replay"].stats.get("error_reliable"))}
    if "endpoint_bound" in r:  # how far an end point can be from the exact refits' (many.conformal)
        cols["endpoint_bound"] = r["endpoint_bound"]
        out["endpoint_bound_max"] = float(f"{float(r['endpoint_bound'].max()):.4g}")
    write_table(out_loc.join("conformal.parquet"), cols, metadata={k: v for k, v in out.items() if k != "output"},
                overwrite=True)
    report, _ = report_target(cfg["report"])  # no training ids in this report
    if report:
        rep = Report(f"Conformal prediction ({r['method']}, α = {r['alpha']}): {cache.uri}")
        rep.table(["", "value"], [[k, v] for k, v in out.items() if k not in ("pipeline", "output")])
        if "sets" in r:
            rep.figure("set-sizes", histogram(r["sets"].sum(1), "labels in the set", "Prediction set sizes",
                                              bins=10), "How many labels each test point's set holds.")
        else:
            rep.figure("widths", histogram(r["upper"] - r["lower"], "interval width", "Interval widths"),
                       "Widths of the prediction intervals.")
            rep.figure("intervals", intervals(r["y"], r["lower"], r["upper"], r["prediction"],
                                              "Intervals, predictions and truth"),
                       "A sample of test points: interval, prediction (dot) and true value (cross).")
        if "coverage" in out:
            rep.figure("coverage", bars(["target 1 − α", "empirical"], [1 - r["alpha"], out["coverage"]],
                                        "coverage", "Coverage on the test set"),
                       "Empirical coverage against the target level.")
        out["report"] = rep.write(report, "conformal").uri
    return out
