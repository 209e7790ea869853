"""Apply pending deletion requests with DeltaGrad and publish a new model version.

Reads request rows (request_id, data_id, timestamp) under ``requests``, validates and de-duplicates
them, replays the cache without the erased rows, verifies a sample against exact retraining,
publishes the new version under ``output`` (previous versions stay intact), settles the requests
and appends an audit record. Idempotent and resumable: killed at any point and run again, every
request is applied exactly once.
"""

from __future__ import annotations

import sys

from pipelines._config import DELTAGRAD, RAY, REQUIRED, main

SCHEMA = {
    "data": None,
    "cache": REQUIRED,
    "requests": REQUIRED,
    "output": REQUIRED,
    "deltagrad": dict(DELTAGRAD),
    "verify": {"sample": 1.0, "tolerance": 0.05},
    "ray": dict(RAY),
    "report": None,
}


def run(cfg: dict) -> dict:
    from deltagrad_ray.core.config import DeltaGradConfig
    from deltagrad_ray.erasure import bulk_erasure
    from deltagrad_ray.report import Report, bars

    kwargs = dict(cache=cfg["cache"], requests=cfg["requests"], output=cfg["output"],
                  config=DeltaGradConfig.from_dict(cfg["deltagrad"]), verify=cfg["verify"], data=cfg["data"])
    ray_cfg = cfg["ray"]
    if ray_cfg["address"] in (None, "local"):
        audits = bulk_erasure(**kwargs)  # one change set: replayed in this process
    else:  # on a cluster: the replay and the verification run on a worker with the block's resources
        import ray

        from deltagrad_ray.distributed.backends import ensure_ray
        ensure_ray(ray_cfg["address"])
        task = ray.remote(num_cpus=float(ray_cfg["num_cpus"]), num_gpus=float(ray_cfg["num_gpus"]),
                          max_retries=2)(bulk_erasure)  # a retried run resumes from its own markers
        audits = ray.get(task.remote(**kwargs))
    out = {"pipeline": "bulk_erasure", "runs": [a["run_id"] for a in audits],
           "applied": sum(a["requests"].get("applied", 0) for a in audits),
           "rejected": sum(a["requests"].get("rejected", 0) for a in audits),
           "published": audits[-1]["new"] if audits else None}
    if cfg["report"] and audits:
        rep = Report("Bulk erasure")
        for a in audits:
            r, v, t = a["requests"], a["verification"] or {}, a["timings"]
            rep.text(f"## Run {a['run_id']}\n\nParent: version {a['parent']['version']} "
                     f"(`{a['parent']['uri']}`, model sha256 `{a['parent']['model_sha256'][7:19]}…`).")
            rep.table(["requests", "count"], [["received", r["received"]], ["applied", r.get("applied", 0)],
                                             ["rejected", r.get("rejected", 0)],
                                             *[[f"— {k}", n] for k, n in r["rejected_by_reason"].items()],
                                             ["distinct ids erased", a["deleted_ids"]]])
            if a["new"]:
                rep.text(f"New version {a['new']['version']} ({a['new']['method']}): `{a['new']['cache']}`, "
                         f"model sha256 `{a['new']['model_sha256'][7:19]}…`.")
            if v.get("performed"):
                rep.table(["verification against exact retraining", "value"],
                          [["‖θ_DeltaGrad − θ_exact‖", v["dist_deltagrad_exact"]],
                           ["‖θ_exact − θ_parent‖ (the erasure's effect)", v["dist_exact_parent"]],
                           ["ratio", v["ratio"]], ["tolerance", v["tolerance"]],
                           ["passed", "yes" if v["passed"] else "no: the exact model was published"]])
                rep.figure(f"timings-{a['run_id']}", bars(["DeltaGrad", "exact retraining"],
                                                          [t["deltagrad_s"] or 0, t["exact_s"] or 0], "seconds",
                                                          "Time to apply the erasure"),
                           "DeltaGrad against exact retraining on the same requests.")
            if a["rejected"]:
                rep.table(["request_id", "data_id", "source", "reason"],
                          [[x["request_id"], x["data_id"], x["source"], x["reason"]] for x in a["rejected"][:50]])
        out["report"] = rep.write(cfg["report"], "bulk_erasure").uri
    return out


if __name__ == "__main__":
    sys.exit(main(__doc__, SCHEMA, run))
