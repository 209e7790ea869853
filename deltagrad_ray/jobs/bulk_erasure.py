"""Apply pending deletion requests with DeltaGrad and publish a new model version.

Reads request rows (request_id, data_id, timestamp) under ``requests``, validates and de-duplicates
them, replays the published version without the erased rows, verifies a sample against exact
retraining, publishes the new version under ``output`` by compare-and-swap (previous versions
stay intact), settles the requests in the ledger and appends an audit record. Holds the lease on
``output`` while it works: another run finds it and exits 0, naming the holder (or waits,
``lease.wait_s`` / ``--wait``). Resumable: killed at any point and run again, every request is
applied exactly once (see :mod:`deltagrad_ray.erasure`).
"""

from __future__ import annotations

import os
import socket
import uuid

from .config import DELTAGRAD, RAY, REQUIRED, S3, report_target

SCHEMA = {
    "data": None,
    "cache": None,            # the first version, until ``output`` publishes one (or train publishes version 0)
    "requests": REQUIRED,
    "output": REQUIRED,
    "ledger": None,           # default: requests/_done
    "deltagrad": dict(DELTAGRAD),
    "verify": {"sample": 1.0, "tolerance": 0.05},
    "lease": {"ttl_s": 300.0, "wait_s": 0.0, "holder": None},
    "ray": dict(RAY),
    "report": None,
    "s3": dict(S3),
}
OPTIONS = (("--wait", "lease.wait_s", float, "seconds to wait for a lease held by another run (default: the "
            "config's lease.wait_s, 0: exit at once)"),)


def defaults(root: str = "demo-output") -> dict:
    """The local defaults (``pipelines/configs/bulk_erasure.yaml``): requests under
    ``root/erasure/requests``, versions under ``root/models`` (train publishes version 0 there)."""
    return {"data": f"{root}/data/mnist.parquet", "cache": f"{root}/models/current",
            "requests": f"{root}/erasure/requests", "output": f"{root}/models", "ledger": None,
            "deltagrad": {"period": 5, "burn_in": 10, "history": 2}, "verify": {"sample": 1, "tolerance": 0.05},
            "lease": {"ttl_s": 300, "wait_s": 0, "holder": None},
            "ray": {"address": None, "workers": 2, "num_cpus": 1, "num_gpus": 0, "mode": "auto", "strategy": "SPREAD",
                    "batch_size": 32},
            "report": {"output": f"{root}/reports", "redact_ids": False}}


def run(cfg: dict) -> dict:
    from ..core.config import DeltaGradConfig
    from ..erasure import LeaseBusy, LeaseSettings, bulk_erasure
    from ..store.location import location

    def portable(uri):
        return None if uri is None else location(uri).portable_uri

    lease = cfg["lease"]
    # one holder name for the whole job: a retried Ray task takes the lease over at once
    holder = lease["holder"] or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    kwargs = dict(cache=portable(cfg["cache"]), requests=portable(cfg["requests"]), output=portable(cfg["output"]),
                  config=DeltaGradConfig.from_dict(cfg["deltagrad"]), verify=cfg["verify"], data=portable(cfg["data"]),
                  ledger=portable(cfg["ledger"]),
                  lease=LeaseSettings(ttl_s=float(lease["ttl_s"]), wait_s=float(lease["wait_s"]), holder=holder))
    ray_cfg = cfg["ray"]
    try:
        if ray_cfg["address"] in (None, "local"):
            audits = bulk_erasure(**kwargs)  # one change set per run: replayed in this process
        else:  # on a cluster: the replay and the verification run on a worker with the block's resources
            import ray

            from ..distributed.backends import ensure_ray
            ensure_ray(ray_cfg["address"])
            task = ray.remote(num_cpus=float(ray_cfg["num_cpus"]), num_gpus=float(ray_cfg["num_gpus"]),
                              max_retries=2)(bulk_erasure)  # a retried run resumes from its own markers
            audits = ray.get(task.remote(**kwargs))
    except LeaseBusy as e:
        busy = getattr(e, "cause", None) or e
        return {"pipeline": "bulk_erasure", "skipped": str(busy).split(" (rerun", 1)[0],
                "lease": {"holder": getattr(busy, "holder", None), "expires": getattr(busy, "expires", None)}}
    published = [a for a in audits if a["new"]]
    out = {"pipeline": "bulk_erasure", "runs": [a["run_id"] for a in audits],
           "applied": sum(a["requests"].get("applied", 0) for a in audits),
           "rejected": sum(a["requests"].get("rejected", 0) for a in audits),
           "published": published[-1]["new"] if published else None}
    report, redact_ids = report_target(cfg["report"])
    if report and audits:
        out["report"] = write_report(audits, report, redact_ids, cfg["output"]).uri
    return out


def write_report(audits: list[dict], root: str, redact_ids: bool, output: str):
    """The Markdown report of some runs; with ``redact_ids`` data ids appear as salted hashes."""
    from ..erasure import redact, redaction_salt
    from ..report import Report, bars

    salt = redaction_salt(output) if redact_ids else None

    def did(x):
        return redact(x, salt) if redact_ids else x

    def why(reason: str, data_id) -> str:
        return reason.replace(str(data_id), did(data_id)) if redact_ids and data_id is not None else reason

    rep = Report("Bulk erasure")
    if redact_ids:
        rep.text("Data ids are shown as salted hashes (`h:…`); request ids as received.")
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
                      [[x["request_id"], did(x["data_id"]), x["source"], why(x["reason"], x["data_id"])]
                       for x in a["rejected"][:50]])
    return rep.write(root, "bulk_erasure")
