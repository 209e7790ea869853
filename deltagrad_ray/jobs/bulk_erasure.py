"""Apply pending deletion requests with DeltaGrad to every model that holds the data, and publish
their new versions.

A config names one request inbox and one model (``cache``, ``output``, ``data``) or many
(``models: [{name, output, cache, data, ledger, deltagrad, ray}]``). The inbox is read once; each
model's erasure is an independent task (on Ray when ``ray.address`` is set or ``ray.workers`` > 1
with several models), with its own lease, compare-and-swap publish, ledger and resources: see
:mod:`deltagrad_ray.erasure`. One model failing does not stop the others.

Exit codes: 0 every model settled its pending requests (or its lease was held by another run,
which does the work); 2 / 3 with one model, its bad input / storage failure; 4 with several, some
failed and the others finished (the result line's ``failed`` names them; their requests pend).
"""

from __future__ import annotations

import os
import socket
import sys
import uuid

from ..core.errors import InputError
from .config import DELTAGRAD, RAY, REQUIRED, S3, PartialRun, check, local_ray, report_target

SCHEMA = {
    "data": None,
    "cache": None,            # the first version, until ``output`` publishes one (or train publishes version 0)
    "output": None,           # one model: its prefix; or ``models``
    "name": None,
    "models": None,           # many models: [{name, output, cache, data, ledger, deltagrad, ray}]
    "requests": REQUIRED,
    "ledger": None,           # a ledger of an older version to honour (new entries go to output/ledger)
    "deltagrad": dict(DELTAGRAD),
    "verify": {"sample": 0.0, "tolerance": 0.05},
    "reconcile": {"max_drift": 0.05, "every_versions": 10},
    "retention": None,        # {superseded_days: D}
    "lease": {"ttl_s": 300.0, "wait_s": 0.0, "holder": None},
    "ray": dict(RAY),
    "report": None,
    "s3": dict(S3),
}
MODEL = {"name": REQUIRED, "output": REQUIRED, "cache": None, "data": None, "ledger": None, "deltagrad": None,
         "ray": {"num_cpus": None, "num_gpus": None, "resources": None}}
ARRAYS = {"models": MODEL}  # for the JSON Schema (config.json_schema): ``models`` is a list of MODEL mappings
OPTIONS = (("--wait", "lease.wait_s", float, "seconds to wait for a lease held by another run (default: the "
            "config's lease.wait_s, 0: exit at once)"),)


def defaults(root: str = "demo-output") -> dict:
    """The local defaults (``pipelines/configs/bulk_erasure.yaml``): requests under
    ``root/erasure/requests``, versions under ``root/models`` (train publishes version 0 there)."""
    return {"data": f"{root}/data/mnist.parquet", "cache": f"{root}/models/current", "output": f"{root}/models",
            "name": None, "models": None, "requests": f"{root}/erasure/requests", "ledger": None,
            "deltagrad": {"burn_in": 10, "history": 2}, "verify": {"sample": 0, "tolerance": 0.05},
            "reconcile": {"max_drift": 0.05, "every_versions": 10},
            "retention": {"superseded_days": None}, "lease": {"ttl_s": 300, "wait_s": 0, "holder": None},
            "ray": local_ray(32),
            "report": {"output": f"{root}/reports", "redact_ids": False}}


def fleet_of(cfg: dict):
    """The :class:`~deltagrad_ray.erasure.Fleet` a (checked) config describes, every setting checked
    before anything is read or written."""
    from ..core.config import DeltaGradConfig
    from ..erasure import (Fleet, LeaseSettings, ReconcileSettings, RetentionSettings, Settings, Target,
                           VerifySettings)
    from ..store.location import location

    def portable(uri):
        return None if uri is None else location(uri).portable_uri

    base = DeltaGradConfig.from_dict(cfg["deltagrad"])
    ray_cfg = cfg["ray"]
    if (cfg["models"] is None) == (cfg["output"] is None):
        raise InputError("config: give either output (one model) or models (a fleet), not both and not neither")
    if cfg["models"] is None:
        out = location(cfg["output"])
        raw = [{"name": cfg["name"] or out.name or "model", "output": cfg["output"], "cache": cfg["cache"],
                "data": cfg["data"], "ledger": cfg["ledger"]}]
    else:
        if any(cfg[k] is not None for k in ("cache", "data", "name")):
            raise InputError("config: with models, give cache, data and name per model (models[i].cache, …)")
        if not isinstance(cfg["models"], list) or not cfg["models"]:
            raise InputError(f"config: models must be a non-empty list of models, got {cfg['models']!r}")
        raw = [check(m, MODEL, f"models[{i}]") for i, m in enumerate(cfg["models"])]
    targets = []
    for i, m in enumerate(raw):
        r = m.get("ray") or {}
        over = m.get("deltagrad") or {}
        if not isinstance(over, dict):
            raise InputError(f"config: models[{i}].deltagrad must be a mapping, got {over!r}")
        res = r.get("resources") or {}
        if not isinstance(res, dict):
            raise InputError(f"config: models[{i}].ray.resources must be a mapping, got {res!r}")
        targets.append(Target(
            str(m["name"]), portable(m["output"]), portable(m.get("cache")), portable(m.get("data")),
            portable(m.get("ledger") if cfg["models"] is not None else cfg["ledger"]),
            DeltaGradConfig.from_dict({**base.to_dict(), **over}),
            float(r["num_cpus"] if r.get("num_cpus") is not None else ray_cfg["num_cpus"]),
            float(r["num_gpus"] if r.get("num_gpus") is not None else ray_cfg["num_gpus"]), dict(res)))
    lease = cfg["lease"]
    # one holder name for the whole job: a retried Ray task takes its model's lease over at once
    holder = lease["holder"] or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    settings = Settings(VerifySettings.from_dict(cfg["verify"]),
                        LeaseSettings(ttl_s=lease["ttl_s"], wait_s=lease["wait_s"], holder=holder),
                        retention=RetentionSettings.from_dict(cfg["retention"]),
                        reconcile=ReconcileSettings.from_dict(cfg["reconcile"]))
    return Fleet(portable(cfg["requests"]), tuple(targets), settings)


def run(cfg: dict) -> dict:
    from ..erasure import erase_fleet
    from ..runtime import EXIT_OK

    fleet = fleet_of(cfg)  # every setting checked before anything is written
    report, redact_ids = report_target(cfg["report"])
    ray_cfg = cfg["ray"]
    workers = int(ray_cfg["workers"])
    if workers < 1:
        raise InputError(f"config: ray.workers must be >= 1, got {workers}")
    address = ray_cfg["address"] if ray_cfg["address"] not in (None, "local") else None
    result = erase_fleet(fleet, address=address, workers=workers,
                         notify=lambda line: print(f"bulk_erasure: {line}", file=sys.stderr, flush=True))
    out = {"pipeline": "bulk_erasure", **result.summary()}
    if len(fleet.models) == 1:  # the single-model result line, as before fleets
        audits = result.outcomes[0].audits
        out["published"] = next((a["new"] for a in reversed(audits) if a.get("new")), None)
        if result.outcomes[0].status == "busy":
            out["skipped"], out["lease"] = result.outcomes[0].message, result.outcomes[0].lease
    if report and any(o.audits for o in result.outcomes):
        out["report"] = write_report(result, fleet, report, redact_ids).uri
    code = result.exit_code()
    if code != EXIT_OK:
        if len(fleet.models) == 1:
            o = result.outcomes[0]
            from ..store.location import StorageError
            raise (InputError if o.kind == "input" else StorageError)(o.message)
        raise PartialRun(out, f"{len(result.failed)} of {len(fleet.models)} models failed: " + "; ".join(
            f"{k}: {v}" for k, v in list(result.failed.items())[:3]))
    return out


def write_report(result, fleet, root: str, redact_ids: bool):
    """The Markdown report: per model its runs; one table per request × model; with ``redact_ids``
    every data id (in tables and in reasons) as a salted hash."""
    from ..erasure import redact, redaction_salt
    from ..report import Report, bars, md

    salts = {t.name: redaction_salt(t.output) for t in fleet.models} if redact_ids else {}
    first_salt = next(iter(salts.values()), b"")

    def did(x, model=None):
        return redact(x, salts.get(model, first_salt)) if redact_ids else ("—" if x is None else x)

    def why(reason, status):
        if reason is None:
            return ""
        if redact_ids:  # a reason quotes the values it judged: say only what kind of problem it was
            return {"not present": "not in this model's training data", "already erased":
                    "erased in an earlier version", "duplicate": "duplicate request"}.get(status, reason.split(" ")[0]
                                                                                         + " …")
        return reason

    rep = Report("Bulk erasure")
    if redact_ids:
        rep.text("Data ids are shown as salted hashes (`h:…`); request ids as received (escaped).")
    rep.table(["model", "outcome", "runs", "published version", "seconds", "message"],
              [[o.model, o.status, len(o.audits),
                next((a["new"]["version"] for a in reversed(o.audits) if a.get("new")), "—"), round(o.seconds, 2),
                o.message or ""] for o in result.outcomes])
    if result.inbox.not_read:
        rep.text("### Files under the inbox that were not read")
        rep.table(["file", "why"], [[f, w] for f, w in result.inbox.not_read[:100]])
    for o in result.outcomes:
        for a in o.audits:
            r, v, t = a["requests"], a["verification"] or {}, a["timings"]
            rep.text(f"## {md(o.model)}: run {md(a['run_id'])}\n\nParent: version {a['parent']['version']} "
                     f"(model sha256 `{a['parent']['model_sha256'][7:19]}…`).")
            rep.table(["requests", "count"], [[k, n] for k, n in r.items()] + [["distinct ids erased",
                                                                                a["deleted_ids"]]])
            if a["new"]:
                rep.text(f"New version {a['new']['version']} ({a['new']['method']}), model sha256 "
                         f"`{a['new']['model_sha256'][7:19]}…`.")
            cert = a.get("certificate")
            if cert:
                rep.table(["certificate", "value"], [[k, val] for k, val in cert.items()
                                                     if not isinstance(val, (dict, list))])
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
    rows = result.table()
    if rows:
        rep.text("## Requests × models\n\nEach request's status in each model, and its verdict across the fleet "
                 "(erased where some model applied it; rejected when malformed or held by no model).")
        shown = rows[:2000]
        rep.table(["request_id", "data_id", "source", "model", "status", "version", "verdict", "reason"],
                  [[x["request_id"] or "—", did(x["data_id"], x["model"]), x["source"], x["model"], x["status"],
                    x["version"] if x["version"] is not None else "—", x["verdict"], why(x["reason"], x["status"])]
                   for x in shown])
        if len(rows) > len(shown):
            rep.text(f"({len(rows) - len(shown)} more rows in the audit records.)")
    return rep.write(root, "bulk_erasure")
