"""Leave-one-out models by DeltaGrad, fanned out on Ray: jackknife estimates and influence.

``cache`` is a trajectory cache or a models prefix (bulk erasure's ``output``, or train's
``publish``), whose published version (``LATEST.json``) is used: results never come from rows
that were erased.
"""

from __future__ import annotations

from .config import RAY, REQUIRED, S3, fanout_job, local_ray, report_target

# verify: K leave-one-out requests retrained exactly, with the order-statistic statement (README, Verification);
# exact_above: every request whose error estimate is above it retrained exactly (many.loo checks both)
SCHEMA = {"cache": REQUIRED, "test": REQUIRED, "output": REQUIRED, "ray": dict(RAY), "report": None, "s3": dict(S3),
          "verify": None, "exact_above": None}


def defaults(root: str = "demo-output") -> dict:
    """The local defaults (``pipelines/configs/jackknife.yaml``): LOO over every training point
    of the diabetes model, on a local Ray."""
    return {"cache": f"{root}/models/diabetes", "test": f"{root}/data/diabetes-test.parquet",
            "output": f"{root}/results/jackknife",
            "ray": local_ray(64),
            "report": f"{root}/reports"}


def run(cfg: dict) -> dict:
    from .. import many
    from ..erasure import redact, redaction_salt
    from ..report import Report, estimate_vs_truth, histogram
    from ..results import estimate_summary, write_table

    cache, out_loc, fan = fanout_job(cfg, "loo.parts")
    loo = many.loo(cache, fanout=fan, strict=True, verify=cfg["verify"], exact_above=cfg["exact_above"])
    fan.progress.close()
    jk = many.jackknife(cache, cfg["test"], loo_result=loo)
    inf = many.influence(cache, cfg["test"], loo_result=loo)
    p, loss = jk.predictions, jk.test_loss
    write_table(out_loc.join("jackknife.parquet"), jk.table(), metadata=jk.metadata(), overwrite=True)
    write_table(out_loc.join("influence.parquet"), inf.table(), metadata=inf.metadata(), overwrite=True)
    stats = loo.replay.stats
    out = {"pipeline": "jackknife", "loo_models": len(loo.ids), "backend": stats.get("backend"),
           "mode": stats.get("mode"), "test_loss": float(loss.estimate), "test_loss_bias_corrected":
           float(loss.bias_corrected), "test_loss_se": float(loss.se), "output": out_loc.uri,
           **estimate_summary(loo.replay), **many.evidence(loo)}
    report, redact_ids = report_target(cfg["report"])
    if report:
        salt = redaction_salt(out_loc) if redact_ids else None
        shown = (lambda i: redact(i, salt)) if redact_ids else (lambda i: i)
        rep = Report(f"Jackknife and influence: {cache.uri}")
        rep.table(["", "value"], [["leave-one-out models (DeltaGrad)", len(loo.ids)],
                                  ["backend", f"{stats.get('backend')} ({stats.get('mode', '')})"],
                                  ["test loss", float(loss.estimate)],
                                  ["jackknife bias-corrected test loss", float(loss.bias_corrected)],
                                  ["jackknife standard error", float(loss.se)],
                                  ["largest error estimate of a model (vs its exact refit)",
                                   "inf (some not certified)" if out["error_estimate_max"] is None
                                   else out["error_estimate_max"]]])
        if loo.verification is not None:
            rep.text("Sampled exact verification: " + loo.verification.statement() + ".")
            v = loo.verification
            rep.figure("estimate-vs-truth", estimate_vs_truth(loo.error_estimate[list(v.indices)], v.errors),
                       "The sampled models: each one's error estimate against its error measured by exact "
                       "retraining (below the diagonal: the estimate covers the truth).")
        order = inf.influence.argsort(descending=True)
        rep.text("Most helpful training points (removing them raises the test loss most)"
                 + (", ids as salted hashes:" if redact_ids else ":"))
        rep.table(["id", "LOO change in test loss"], [[shown(int(inf.ids[i])), float(inf.influence[i])]
                                                      for i in order[:10]])
        rep.figure("influence", histogram(inf.influence, "L(θ without i) − L(θ)", "Leave-one-out influence",
                                          log=True), "Influence of every training point on the test loss.")
        se = p.se.reshape(len(jk.test_ids), -1).max(dim=1).values
        rep.figure("se", histogram(se, "jackknife standard error", "Uncertainty of the test predictions"),
                   "Per test point, the largest jackknife standard error of its predicted probabilities "
                   "(or of its prediction, for regression).")
        out["report"] = rep.write(report, "jackknife").uri
    return out
