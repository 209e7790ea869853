"""The operator's view: where each model stands, the receipt for one id, and the operator's actions
(abandon an open plan, repair a pointer).

* :func:`status` — per model: the published version and its lineage, open plans, the lease, pending
  requests, the last failure, ledger entries that were not believed.
* :func:`trace` — the receipt a data-protection officer asks for: for every model of the fleet, did
  it hold the id, which version erased it (which run, when, for which request), and does any
  version still hold it — checked against each version's own cache (its removed rows), not only the
  ledger — until when retention keeps it, and whether the training data still holds the row.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ..core.errors import InputError
from ..store.cache import Cache
from ..store.location import Conflict, Location, StorageError, location
from ..store.records import create
from ..store.registry import Registry, now
from .lease import Lease, LeaseSettings, read_lease
from .ledger import Ledger, pending_rows, settlements
from .plan import Plan, Runs
from .requests import LEGACY_LEDGER, read_inbox
from .retention import RetentionSettings, pruned, superseded_deadlines
from .run import Target, _closed_audit, _Model


def _model_stores(target: Target, inbox: str | None) -> tuple[Registry, Runs, Ledger]:
    legacy = ([location(inbox).join(LEGACY_LEDGER)] if inbox else []) + ([target.ledger] if target.ledger else [])
    return Registry(target.output), Runs(target.output), Ledger(target.output, legacy)


def model_status(target: Target, inbox: str | None = None) -> dict:
    """Where one model's output stands (see the module docstring); a damaged output is reported in
    ``error`` (the rest as far as it could be read)."""
    reg, runs, led = _model_stores(target, inbox)
    out: dict = {"model": target.name, "output": reg.root.uri}
    try:
        out["lease"] = read_lease(reg.root)
        out["last_failure"] = runs.last_failure()
        latest, etag = reg.read_latest()
        out["published"] = None if latest is None else {
            "version": latest.version, "run_id": latest.run_id, "method": latest.method,
            "published": latest.published, "model_sha256": latest.model_sha256, "certificate": latest.certificate}
        out["lineage"] = [{"version": r.version, "run_id": r.run_id, "method": r.method, "applied": r.applied,
                           "published": r.published, "pruned": pruned(reg.root, r.version) is not None}
                          for r in reg.lineage()]
        done = settlements(led, runs, reg, latest)
        closed = runs.closed()
        open_plans = []
        plans = runs.plans(skip=set(done.runs) | set(closed))
        for p in plans:
            rec = reg.version_record(p.version, latest)
            state = ("published, not yet settled" if rec is not None and rec.run_id == p.run_id
                     else "resumable" if p.parent.etag == etag else "stale: will be closed as superseded")
            open_plans.append({"run_id": p.run_id, "created": p.created, "version": p.version,
                               "parent_version": p.parent.version, "requests": len(p.requests),
                               "delete_ids": len(p.delete_ids), "state": state})
        out["open_plans"] = open_plans
        out["closed"] = [{"run_id": k, **v} for k, v in sorted(closed.items())]
        out["ignored_ledger_entries"] = [{"run_id": r, "file": f, "why": w} for r, f, w in done.ignored]
        out["calibration"] = calibration(reg)
        if inbox is not None:
            box = read_inbox(inbox)
            out["pending"] = len(pending_rows(box.requests, done, [r for p in plans for r in p.requests]))
            out["not_read"] = [f for f, _ in box.not_read]
        else:
            out["pending"] = None
    except (StorageError, InputError) as e:
        out["error"] = str(e)
    return out


def calibration(reg: Registry) -> dict | None:
    """The certificate's record so far: versions whose sampled verification measured the true error
    beside the estimate (how often the estimate was at least the truth)."""
    pairs = []
    for rec in reg.lineage():
        cert = rec.certificate or {}
        v = cert.get("verification") or {}
        if v.get("performed") and cert.get("error_estimate") is not None and v.get("ratio") is not None:
            pairs.append((float(cert["error_estimate"]), float(v["ratio"])))
    if not pairs:
        return None
    return {"verified_versions": len(pairs), "estimate_at_least_truth": sum(e >= t for e, t in pairs) / len(pairs),
            "max_truth_over_estimate": max((t / e if e > 0 else float("inf")) for e, t in pairs)}


def status(targets: Sequence[Target] | Target, inbox: str | None = None) -> list[dict]:
    """:func:`model_status` of every model (of a fleet, or one)."""
    if isinstance(targets, Target):
        targets = [targets]
    return [model_status(t, inbox) for t in targets]


# -- the receipt -----------------------------------------------------------------------------------------

def _ids_of(cache: Cache, data: str | None, memo: dict) -> np.ndarray:
    key = (cache.manifest.data.uri, data, cache.manifest.files.get("added.parquet"))
    if key not in memo:
        memo[key] = cache.row_ids(data)[0]
    return memo[key]


def _holds(cache: Cache, data_id: int, data: str | None, memo: dict) -> tuple[bool, bool]:
    """(held, still held): the cache's rows include the id; and it is not among its removed rows."""
    ids = _ids_of(cache, data, memo)
    rows = np.nonzero(ids == data_id)[0]
    if len(rows) == 0:
        return False, False
    removed = cache.removed_mask()
    return True, bool(removed is None or not bool(removed[int(rows[0])]))


def trace_model(target: Target, data_id: int, retention: RetentionSettings | None = None) -> dict:
    """The receipt of one id for one model (see :func:`trace`)."""
    reg, runs = Registry(target.output), Runs(target.output)
    out: dict = {"model": target.name, "output": reg.root.uri, "data_id": data_id}
    memo: dict = {}
    try:
        lineage = reg.lineage()
        if not lineage:
            out.update(held=None, note="no version published")
            return out
        latest = lineage[0]
        held, still = _holds(reg.open(latest), data_id, target.data, memo)
        out["held"] = held
        if not held:
            return out
        erased_in = None
        for rec in reversed(lineage):
            if rec.method in ("deltagrad", "exact-retrain") and runs.plan_file(rec.run_id).exists():
                plan = runs.plan(rec.run_id)
                if data_id in plan.delete_ids:
                    erased_in = {"version": rec.version, "run_id": rec.run_id, "published": rec.published,
                                 "method": rec.method,
                                 "requests": [r.request_id for r in plan.requests
                                              if r.data_id == data_id and r.status == "applied"]}
                    break
        out["erased"] = erased_in
        deadlines = superseded_deadlines(reg, retention)
        versions = []
        for rec in lineage:
            entry: dict = {"version": rec.version}
            gone = pruned(reg.root, rec.version)
            if gone is not None:
                entry.update(holds=False, state=f"cache deleted {gone.get('pruned')}")
            else:
                try:
                    _, h = _holds(reg.open(rec), data_id, target.data, memo)
                except StorageError as e:
                    entry.update(holds=None, state=f"cache unreadable ({str(e)[:120]})")
                else:
                    entry["holds"] = h
                    entry["state"] = "latest" if rec is latest else "superseded"
                    if h and rec.version in deadlines:
                        entry["until"] = deadlines[rec.version]["until"] or "kept (no retention set)"
                    if rec.key is None:
                        entry["outside_prefix"] = rec.cache
            versions.append(entry)
        out["versions"] = versions
        out["latest_holds"] = still
        out["survives_in"] = [v["version"] for v in versions if v.get("holds")]
        try:
            from ..store.datasets import read_id_column
            src = reg.open(latest).data_location(target.data)  # a stored URI brings no storage settings
            out["training_data_holds"] = bool(np.any(read_id_column(src) == data_id))
        except (StorageError, InputError) as e:
            out["training_data_holds"] = f"unknown ({str(e)[:100]})"
    except (StorageError, InputError) as e:
        out["error"] = str(e)
    return out


def trace(targets: Sequence[Target], *, data_id: int | None = None, request_id: str | None = None,
          inbox: str | None = None, retention: RetentionSettings | None = None) -> dict:
    """The receipt: for every model, did it hold the id, which version erased it (run, time,
    requests), which versions still hold it and until when, and whether its training data does.

    Args:
      targets: the fleet's models.
      data_id: the id; or ``request_id``: the request (its data ids are looked up in the inbox and
        in the models' plans).
      inbox: the requests prefix (for ``request_id``).
      retention: the retention policy (for "until when").

    Returns:
      ``{"data_ids": [...], "models": [per model and id], "gone_everywhere": bool}``.
    """
    if (data_id is None) == (request_id is None):
        raise InputError("give a data id or a request id (one of them)")
    ids: list[int] = []
    if data_id is not None:
        ids = [int(data_id)]
    else:
        if inbox is not None:
            ids += [r.data_id for r in read_inbox(inbox).requests if r.request_id == request_id and r.valid]
        for t in targets:
            try:
                for p in Runs(t.output).plans():
                    ids += [r.data_id for r in p.requests if r.request_id == request_id and r.data_id is not None]
            except StorageError:
                pass
        ids = sorted(set(ids))
        if not ids:
            raise InputError(f"no request {request_id!r} in the inbox or in any model's plans")
    rows = [trace_model(t, i, retention) for i in ids for t in targets]
    gone = all(not r.get("survives_in") and "error" not in r for r in rows)
    return {"data_ids": ids, "request_id": request_id, "models": rows, "gone_everywhere": gone}


# -- operators' actions ---------------------------------------------------------------------------------

def abandon(run_id: str, output: str | Location, *, reason: str = "abandoned by an operator",
            lease: LeaseSettings = LeaseSettings()) -> dict:
    """Abandon an open plan: it will never publish, and its requests pend again (recorded in the audit).

    Takes the lease (so no run works meanwhile) and moves LATEST.json's ETag (rewriting the same
    version with a ``touched`` note), so that a run still carrying the plan somewhere can no
    longer publish it. A plan already published or settled cannot be abandoned.

    Returns:
      The audit record of the abandon.
    """
    reg, runs = Registry(output), Runs(output)
    if not runs.plan_file(run_id).exists():
        raise InputError(f"{reg.root.uri}: no plan {run_id!r}; `erasure status` lists the open plans")
    plan: Plan = runs.plan(run_id)
    led = Ledger(output)
    with Lease(reg.root, lease) as held:
        latest, etag = reg.read_latest()
        rec = reg.version_record(plan.version, latest)
        if rec is not None and rec.run_id == run_id:
            raise InputError(f"run {run_id} published version {plan.version}; a published erasure cannot be "
                             "abandoned (its requests are out of the model)")
        if led.entry(run_id).exists():
            raise InputError(f"run {run_id} is settled already (ledger {led.entry(run_id).uri}); nothing to abandon")
        if runs.is_closed(run_id):
            raise InputError(f"run {run_id} is closed already ({runs.closed()[run_id]['reason']})")
        if latest is not None and plan.parent.etag == etag:
            # the plan could still publish: move LATEST's ETag so that it cannot
            touched = replace(latest, extra={**latest.extra, "touched": {"at": now(), "by": f"abandon {run_id}"}})
            reg.publish(touched, etag)
        runs.close(plan, "abandoned", reason)
        m = _Model(Target(plan.model, reg.root.portable_uri), plan.inbox or reg.root.portable_uri)
        return _closed_audit(m, plan, "abandoned", {"reason": reason, "lease_holder": held.holder})


def repair(output: str | Location, lease: LeaseSettings = LeaseSettings()) -> dict:
    """Point LATEST.json back at the lineage's newest version (see :meth:`Registry.repair`), under the
    lease, and record it in the audit."""
    reg = Registry(output)
    with Lease(reg.root, lease) as held:
        out = reg.repair()
        if out["before"] != out["after"] or out["reason"].startswith("LATEST.json restored"):
            create(reg.root.join("audit", f"{now().replace(':', '')}-repair.json"),
                   {"outcome": "repaired", "finished": now(), "lease_holder": held.holder, **out})
    return out


# -- reports for people ------------------------------------------------------------------------------------

def redaction_salt(output: str | Location) -> bytes:
    """The salt of the hashes that replace data ids in reports: made once per output prefix
    (``output/_redaction_salt``, create-only) so hashes stay comparable across runs, and kept
    beside the models, not in the reports."""
    loc = location(output).join("_redaction_salt")
    cur = loc.read_versioned()
    if cur is None:
        try:
            loc.create(os.urandom(32).hex().encode())
        except Conflict:
            pass
        cur = loc.read_versioned()
    return cur[0]


def redact(data_id, salt: bytes) -> str:
    """A data id as a salted hash (``h:`` + 12 hex digits); None as a dash."""
    if data_id is None:
        return "—"
    return "h:" + hashlib.sha256(salt + str(data_id).encode()).hexdigest()[:12]


__all__ = ["abandon", "calibration", "model_status", "redact", "redaction_salt", "repair", "status", "trace",
           "trace_model"]
