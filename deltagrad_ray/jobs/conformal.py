"""Jackknife+ / CV+ prediction intervals or sets from DeltaGrad refits, fanned out on Ray.

``cache`` is a trajectory cache or a models prefix whose published version (``LATEST.json``)
is used.
"""

from __future__ import annotations

from .config import RAY, REQUIRED, S3, fanout_job, local_ray, report_target

# verify: K of the models (leave-one-out or fold) retrained exactly, with the order-statistic statement
SCHEMA = {"cache": REQUIRED, "test": REQUIRED, "output": REQUIRED, "alpha": 0.1, "method": "jackknife+",
          "folds": 10, "ray": dict(RAY), "report": None, "s3": dict(S3), "verify": None}


def defaults(root: str = "demo-output") -> dict:
    """The local defaults (``pipelines/configs/conformal.yaml``): jackknife+ intervals for the
    diabetes test set, on a local Ray."""
    return {"cache": f"{root}/models/diabetes", "test": f"{root}/data/diabetes-test.parquet",
            "output": f"{root}/results/conformal", "alpha": 0.1, "method": "jackknife+", "folds": 10,
            "ray": local_ray(64),
            "report": f"{root}/reports"}


def run(cfg: dict) -> dict:
    from .. import many
    from ..report import Report, bars, estimate_vs_truth, histogram, intervals
    from ..results import estimate_summary, write_table

    cache, out_loc, fan = fanout_job(cfg, "models.parts")
    r = many.conformal(cache, cfg["test"], float(cfg["alpha"]), method=cfg["method"], folds=int(cfg["folds"]),
                       fanout=fan, verify=cfg["verify"])
    fan.progress.close()
    out = {"pipeline": "conformal", **r.metadata(), "output": out_loc.join("conformal.parquet").uri,
           **estimate_summary(r.replay), **many.evidence(r)}
    write_table(out_loc.join("conformal.parquet"), r.table(), metadata=r.metadata(), overwrite=True)
    report, _ = report_target(cfg["report"])  # no training ids in this report
    if report:
        rep = Report(f"Conformal prediction ({r.method}, α = {r.alpha}): {cache.uri}")
        rep.table(["", "value"], [[k, v] for k, v in out.items() if k not in ("pipeline", "output")])
        if r.sets is not None:
            rep.figure("set-sizes", histogram(r.sets.sum(1), "labels in the set", "Prediction set sizes",
                                              bins=10), "How many labels each test point's set holds.")
        else:
            rep.figure("widths", histogram(r.upper - r.lower, "interval width", "Interval widths"),
                       "Widths of the prediction intervals.")
            rep.figure("intervals", intervals(r.y, r.lower, r.upper, r.prediction,
                                              "Intervals, predictions and truth"),
                       "A sample of test points: interval, prediction (dot) and true value (cross).")
        v, est = r.verification, r.replay.stats.get("error_estimate")
        if v is not None:
            rep.text("Sampled exact verification of the models behind the intervals: " + v.statement() + ".")
            if est is not None:
                rep.figure("estimate-vs-truth", estimate_vs_truth(est[list(v.indices)], v.errors),
                           "The sampled models: each one's error estimate against its error measured by exact "
                           "retraining (below the diagonal: the estimate covers the truth).")
        if "coverage" in out:
            rep.figure("coverage", bars(["target 1 − α", "empirical"], [1 - r.alpha, out["coverage"]],
                                        "coverage", "Coverage on the test set"),
                       "Empirical coverage against the target level.")
        out["report"] = rep.write(report, "conformal").uri
    return out
