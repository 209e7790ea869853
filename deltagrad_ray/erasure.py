"""Bulk erasure: apply pending deletion requests with DeltaGrad, publish a new version, keep an audit.

Locations (any URI):

    requests/                     request files: Parquet or JSONL rows (request_id, data_id, timestamp)
    requests/_done/<run>.json     the ledger: requests a run has settled (applied or rejected, with reason)
    output/LATEST.json            the published version: {version, cache, run_id, ...} — the only object
                                  ever overwritten, atomically
    output/versions/<NNNN>/       each version's trajectory cache (never overwritten)
    output/runs/<run>/plan.json   what a run will do, written before it does anything
    output/runs/<run>/result.json written once the new cache is committed
    output/audit/<time>-<run>.json the audit record of each run

A run is idempotent and resumable. It first finishes any plan left open by a run that died
(its requests are not in the ledger yet), re-doing only the steps whose marker is missing, then
plans the requests still pending. Requests are identified by ``request_id``, so a request is
applied in exactly one version, however many times the job is killed and restarted; the previous
version stays intact and loadable throughout.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import random
import time
import uuid
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from .core.errors import InputError
from .core.config import DeltaGradConfig
from .store.cache import Cache, open_cache
from .store.location import Location, StorageError, location

DONE_DIR = "_done"


@dataclass
class Request:
    """One request row, as read, with what became of it."""

    request_id: str
    data_id: int | None
    timestamp: str | None
    source: str
    status: str = "pending"      # pending | applied | rejected
    reason: str | None = None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _rows_of(loc: Location) -> list[dict]:
    raw = loc.read_bytes()
    if loc.name.endswith(".parquet"):
        try:
            return pq.read_table(pa.BufferReader(raw)).to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{loc.uri}: not a readable Parquet file ({e})") from None
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rows.append(obj if isinstance(obj, dict) else {"_malformed": f"line {lineno}: not a JSON object"})
        except json.JSONDecodeError as e:
            rows.append({"_malformed": f"line {lineno}: not JSON ({e.msg})"})
    return rows


def read_requests(prefix: str | Location) -> list[Request]:
    """Every request row under ``prefix`` (Parquet and JSONL files; the ledger excluded).

    Malformed rows are kept, with the problem as their reason: they are reported, not dropped.
    """
    root = location(prefix)
    out: list[Request] = []
    for f in root.list(recursive=True):
        rel = f.uri[len(root.uri.rstrip("/")) + 1:]
        if rel.startswith(DONE_DIR + "/") or not (f.name.endswith(".parquet") or f.name.endswith(".jsonl")):
            continue
        try:
            rows = _rows_of(f)
        except (InputError, StorageError) as e:  # an unreadable file is reported, the others still apply
            out.append(Request(f"malformed-file:{rel}", None, None, rel, "rejected", f"unreadable file: {e}"))
            continue
        for i, row in enumerate(rows):
            src = f"{rel}#{i}"
            if "_malformed" in row:
                out.append(Request(f"malformed:{src}", None, None, src, "rejected", row["_malformed"]))
                continue
            rid, did, ts = row.get("request_id"), row.get("data_id"), row.get("timestamp")
            if rid is None or str(rid).strip() == "":
                out.append(Request(f"malformed:{src}", None, None, src, "rejected", "missing request_id"))
                continue
            try:
                did_int = int(did)
                if isinstance(did, float) and not did.is_integer():
                    raise ValueError
            except (TypeError, ValueError):
                out.append(Request(str(rid), None, ts and str(ts), src, "rejected",
                                   f"malformed data_id {did!r}: expected an integer id"))
                continue
            out.append(Request(str(rid), did_int, None if ts is None else str(ts), src))
    return out


def settled(prefix: str | Location) -> dict[str, dict]:
    """request_id → ledger entry, for every request a finished run settled."""
    out: dict[str, dict] = {}
    for f in location(prefix).join(DONE_DIR).list():
        for entry in json.loads(f.read_text())["requests"]:
            # a request that was applied stays applied, whatever its duplicates' fate
            if out.get(entry["request_id"], {}).get("status") != "applied":
                out[entry["request_id"]] = entry
    return out


@dataclass
class Plan:
    """What one run does, written before it does it (``runs/<run>/plan.json``)."""

    run_id: str
    created: str
    version: int
    parent: dict                         # {uri, run_id, version, model_sha256}
    target: str                          # where the new version's cache goes
    delete_ids: list[int]
    requests: list[dict]                 # Request fields, with status and reason decided
    deltagrad: dict = field(default_factory=dict)
    verify: dict = field(default_factory=dict)


class Registry:
    """Versions, plans and audit records under ``output``."""

    def __init__(self, output: str | Location) -> None:
        self.root = location(output)

    def latest(self) -> dict | None:
        loc = self.root.join("LATEST.json")
        return json.loads(loc.read_text()) if loc.exists() else None

    def publish(self, record: dict) -> None:
        self.root.join("LATEST.json").write_text(json.dumps(record, indent=1, sort_keys=True), overwrite=True)

    def plans(self) -> list[Plan]:
        out = []
        for f in self.root.join("runs").list(recursive=True):
            if f.name == "plan.json":
                out.append(Plan(**json.loads(f.read_text())))
        return sorted(out, key=lambda p: p.created)

    def run_file(self, run_id: str, name: str) -> Location:
        return self.root.join("runs", run_id, name)

    def next_version(self) -> int:
        used = [p.version for p in self.plans()]
        latest = self.latest()
        return max(used + [latest["version"] if latest else 0]) + 1


def _model_sha(cache: Cache) -> str:
    return cache.manifest["files"]["model.safetensors"]["sha256"]


def plan_erasure(registry: Registry, base_cache: str | Location, requests_prefix: str | Location,
                 config: DeltaGradConfig, verify: dict, data: str | Location | None = None) -> Plan | None:
    """Validate and de-duplicate the pending requests against the current version; None if none pend."""
    done = settled(requests_prefix)
    in_open = {r["request_id"] for p in registry.plans() if not _is_done(requests_prefix, p)
               for r in p.requests}
    rows = [r for r in read_requests(requests_prefix) if r.request_id not in done and r.request_id not in in_open]
    if not rows:
        return None
    latest = registry.latest()
    parent_uri = latest["cache"] if latest else location(base_cache).uri
    parent = open_cache(parent_uri)
    rows_data = parent.data(data)
    removed = parent.removed_mask()
    removed_ids = set(rows_data.ids[removed].tolist()) if removed is not None else set()
    known = set(rows_data.ids.tolist())
    seen_request, to_delete = set(), []
    for r in rows:
        if r.status == "rejected":
            continue
        if r.request_id in seen_request:
            r.status, r.reason = "rejected", "duplicate request_id (already in this batch)"
            continue
        seen_request.add(r.request_id)
        if r.data_id not in known:
            r.status, r.reason = "rejected", f"unknown data_id {r.data_id}: not in the training data"
        elif r.data_id in removed_ids:
            r.status, r.reason = "rejected", f"data_id {r.data_id} was already erased in an earlier version"
        else:
            r.status = "applied"
            if r.data_id not in to_delete:
                to_delete.append(r.data_id)
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    version = registry.next_version()
    plan = Plan(run_id, _now(), version,
                {"uri": parent.uri, "run_id": parent.manifest["run_id"],
                 "version": latest["version"] if latest else 0, "model_sha256": _model_sha(parent)},
                registry.root.join("versions", f"{version:04d}").uri, sorted(to_delete),
                [asdict(r) for r in rows],
                config.to_dict(), {**dict(verify), "data": None if data is None else str(data)})
    registry.run_file(run_id, "plan.json").write_text(json.dumps(asdict(plan), indent=1, sort_keys=True))
    return plan


def _is_done(requests_prefix, plan: Plan) -> bool:
    return location(requests_prefix).join(DONE_DIR, f"{plan.run_id}.json").exists()


def execute(registry: Registry, plan: Plan, requests_prefix: str | Location) -> dict:
    """Carry a plan through; each step is skipped when its marker says it was done. Returns the audit.

    Steps: replay into ``plan.target`` (marker: its committed manifest) → verify → ``result.json``
    → publish ``LATEST.json`` (marker: it names this run) → the ledger entry → the audit record.
    """
    from . import api

    t0 = time.perf_counter()
    parent = open_cache(plan.parent["uri"])
    cfg = DeltaGradConfig.from_dict(plan.deltagrad)
    result_loc = registry.run_file(plan.run_id, "result.json")
    if not plan.delete_ids:
        result: dict = {"new_version": None, "note": "no valid request: nothing to erase"}
    elif result_loc.exists():
        result = json.loads(result_loc.read_text())
    else:
        t = time.perf_counter()
        if location(plan.target).join("manifest.json").exists():  # committed by a run that died just after
            diag: dict = {"resumed": True}
        else:
            diag = api.unlearn(parent, delete=plan.delete_ids, config=cfg, out_cache=plan.target,
                               note={"erasure_run": plan.run_id}, data=plan.verify.get("data")).diagnostics()
        new = open_cache(plan.target)
        result = {"new_version": plan.version, "deltagrad_cache": new.uri, "deltagrad_sha256": _model_sha(new),
                  "diagnostics": diag, "deltagrad_s": time.perf_counter() - t,
                  **_verify(parent, new, plan)}
        result_loc.write_text(json.dumps(result, indent=1, sort_keys=True))
    if result["new_version"] is not None:
        latest = registry.latest()
        if latest is None or latest.get("run_id") != plan.run_id:
            registry.publish({"version": plan.version, "cache": result["published"], "run_id": plan.run_id,
                              "parent": plan.parent, "model_sha256": result["published_sha256"],
                              "updated": _now()})
    ledger = location(requests_prefix).join(DONE_DIR, f"{plan.run_id}.json")
    if not ledger.exists():
        ledger.write_text(json.dumps({"run_id": plan.run_id, "settled": _now(),
                                      "requests": [{"request_id": r["request_id"], "data_id": r["data_id"],
                                                    "status": r["status"], "reason": r["reason"]}
                                                   for r in plan.requests]}, indent=1))
    counts: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in plan.requests:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        if r["reason"]:
            key = _reason_kind(r["reason"])
            reasons[key] = reasons.get(key, 0) + 1
    audit = {"run_id": plan.run_id, "created": plan.created, "finished": _now(), "parent": plan.parent,
             "new": None if result["new_version"] is None else {
                 "version": plan.version, "cache": result["published"], "model_sha256": result["published_sha256"],
                 "method": "deltagrad" if result["published"] == result["deltagrad_cache"] else "exact-retrain"},
             "requests": {"received": len(plan.requests), **counts, "rejected_by_reason": reasons,
                          "request_ids": [r["request_id"] for r in plan.requests]},
             "rejected": [{"request_id": r["request_id"], "data_id": r["data_id"], "source": r["source"],
                           "reason": r["reason"]} for r in plan.requests if r["status"] == "rejected"],
             "deleted_ids": len(plan.delete_ids), "verification": result.get("verification"),
             "diagnostics": result.get("diagnostics"),
             "timings": {"deltagrad_s": result.get("deltagrad_s"),
                         "exact_s": (result.get("verification") or {}).get("exact_s"),
                         "run_s": time.perf_counter() - t0}}
    registry.root.join("audit", f"{plan.created.replace(':', '')}-{plan.run_id}.json").write_text(
        json.dumps(audit, indent=1, sort_keys=True), overwrite=True)
    return audit


def _reason_kind(reason: str) -> str:
    """The kind of a rejection, for counts: 'unknown data_id', 'malformed data_id', 'duplicate request_id', …"""
    for kind in ("unknown data_id", "malformed data_id", "duplicate request_id", "already erased",
                 "missing request_id", "unreadable file"):
        if kind in reason:
            return kind
    return "malformed row"


def _verify(parent: Cache, new: Cache, plan: Plan) -> dict:
    """Check the new model against exact retraining on a sample of runs (``verify.sample`` ∈ [0, 1]).

    If DeltaGrad is off by more than ``verify.tolerance`` (relative to the change's own effect),
    the exact retraining is published instead — recorded as a cache of its own, so that later
    erasures replay from it. Returns the verification and what to publish.
    """
    from . import api
    sample, tol = float(plan.verify.get("sample", 0)), float(plan.verify.get("tolerance", 0.05))
    if not (0 <= sample <= 1):
        raise InputError(f"verify.sample must be in [0, 1], got {sample}")
    out = {"published": new.uri, "published_sha256": _model_sha(new)}
    if random.Random(plan.run_id).random() >= sample:
        return {**out, "verification": {"performed": False}}
    t = time.perf_counter()
    data = plan.verify.get("data")
    exact = api.retrain_exact(parent, delete=plan.delete_ids, data=data)
    exact_s = time.perf_counter() - t
    moved = float((exact - parent.final).norm())
    dist = float((new.final - exact).norm())
    ratio = dist / moved if moved > 0 else (0.0 if dist == 0 else math.inf)
    out["verification"] = {"performed": True, "dist_deltagrad_exact": dist, "dist_exact_parent": moved,
                           "ratio": ratio, "tolerance": tol, "passed": ratio <= tol, "exact_s": exact_s}
    if ratio > tol:
        target = location(plan.target + "-exact")
        if not target.join("manifest.json").exists():
            api.retrain_exact(parent, delete=plan.delete_ids, out_cache=target, data=data,
                              note={"erasure_run": plan.run_id})
        exact_cache = open_cache(target)
        out.update(published=exact_cache.uri, published_sha256=_model_sha(exact_cache))
    return out


def bulk_erasure(*, cache: str | Location, requests: str | Location, output: str | Location,
                 config: DeltaGradConfig = DeltaGradConfig(), verify: dict | None = None,
                 data: str | Location | None = None) -> list[dict]:
    """Finish any open run, then apply the pending requests. Returns the audit record of each run done.

    Args:
      cache: the first version's cache (used until ``output`` has published one).
      requests: the prefix holding request files and the ledger.
      output: where versions, plans and audit records go.
      config: DeltaGrad settings.
      verify: ``{sample, tolerance}``: the fraction of runs checked against exact retraining, and
        the error (relative to the erasure's effect) above which the exact model is published.
      data: the training data, if not at the location recorded in the cache.
    """
    reg = Registry(output)
    audits = []
    for plan in reg.plans():
        if not _is_done(requests, plan):
            audits.append(execute(reg, plan, requests))
    plan = plan_erasure(reg, cache, requests, config, verify or {}, data)
    if plan is not None:
        audits.append(execute(reg, plan, requests))
    return audits


def resolve_cache(uri: str | Location) -> str:
    """A cache location, or an output prefix whose LATEST.json names the published one."""
    loc = location(uri)
    if loc.join("manifest.json").exists():
        return loc.uri
    latest = loc.join("LATEST.json")
    if latest.exists():
        return json.loads(latest.read_text())["cache"]
    raise StorageError(f"{loc.uri}: neither a trajectory cache nor a models prefix with LATEST.json")
