"""Bulk erasure: apply pending deletion requests with DeltaGrad, publish a new version, keep an audit.

Locations (any URI):

    requests/                      request files: Parquet or JSONL rows (request_id, data_id, timestamp)
    ledger/  (default requests/_done/)
             <run>.json            the requests a finished run settled (applied or rejected, with reason)
    output/_lease.json             who works on ``output`` now, and until when
    output/LATEST.json             the published version: {version, run_id, cache, key, parent, ...}
    output/versions/<NNNN>.json    the record of every published version (the lineage)
    output/plans/<run>.json        what a run will do, written before it does anything
    output/runs/<run>/cache-<a>/   the run's replayed cache (a fresh attempt directory per try)
    output/runs/<run>/exact-<a>/   its exact retraining, when verification fails
    output/runs/<run>/result.json  what the run computed (its marker: the new cache is committed)
    output/closed/<run>.json       a run that will never publish (superseded or abandoned)
    output/audit/<time>-<run>.json the audit record of each run

The protocol. Every object but ``_lease.json`` and ``LATEST.json`` is written once, create-only
(``If-None-Match: *`` on S3, ``os.link`` locally): plans, results, version records, ledger
entries and audit records are an append-only history, and a step whose object exists is done.

* **Lease.** A run takes ``_lease.json`` (created if absent; taken over by compare-and-swap on
  its ETag when expired, released, or held by the same holder name), renews it while it works
  and releases it at the end. A run that finds a live lease does nothing (:class:`LeaseBusy`
  names the holder and expiry) or waits for it. The lease saves duplicate work; correctness
  does not depend on it.
* **Publishing by compare-and-swap.** A plan records the ETag of ``LATEST.json`` it read; the new
  version is that version + 1, its parent that version, and ``LATEST.json`` changes only with
  ``If-Match`` on that ETag. A run that loses (LATEST moved: another run published first) closes
  its plan as superseded and plans again on top of the new version, so a model that lacks an
  erasure already published is never published.
* **Markers.** A run resumes from whatever it finds: an open plan whose parent is still LATEST is
  carried on (its committed cache reused, or replayed again in a fresh attempt directory, so a
  partial write never blocks it); a plan that was published but not settled gets its version
  record, audit and ledger entry; an open plan whose parent is no longer LATEST is closed.
  Requests are identified by ``request_id`` and settled in one ledger entry, written only after
  the run's version is published: each is applied in exactly one version.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa

from .core.config import DeltaGradConfig
from .core.errors import InputError
from .store.cache import MANIFEST, Cache, open_cache
from .store.datasets import parquet_table
from .store.location import Conflict, Location, StorageError, location

DONE_DIR = "_done"
LEASE = "_lease.json"
LATEST = "LATEST.json"


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


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def _json(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode("utf-8")


def _create(loc: Location, obj) -> bool:
    """Create-only write of a JSON object; False if it was there already (a step done before)."""
    try:
        loc.create(_json(obj))
        return True
    except Conflict:
        return False


# -- requests and the ledger ---------------------------------------------------------------------------

def _rows_of(loc: Location) -> list[dict]:
    if loc.name.endswith(".parquet"):
        try:  # an Arrow buffer, not Python bytes: Arrow's threads must not own Python objects (exits.py)
            return parquet_table(loc.read_buffer()).to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{loc.uri}: not a readable Parquet file ({e})") from None
    raw = loc.read_bytes()
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


class Ledger:
    """The settled requests: one create-only entry per finished run (``<run>.json``).

    Args:
      requests: the requests prefix.
      ledger: the ledger's own prefix (default ``requests/_done``), e.g. one that whoever drops
        request files cannot write.
    """

    def __init__(self, requests: str | Location, ledger: str | Location | None = None) -> None:
        self.root = location(ledger) if ledger is not None else location(requests).join(DONE_DIR)

    def entry(self, run_id: str) -> Location:
        return self.root.join(f"{run_id}.json")

    def runs(self) -> set[str]:
        """The runs that have an entry."""
        return {f.name[:-5] for f in self.root.list() if f.name.endswith(".json")}

    def settled(self) -> dict[str, dict]:
        """request_id → ledger entry, for every request a finished run settled."""
        out: dict[str, dict] = {}
        for f in self.root.list():
            if not f.name.endswith(".json"):
                continue
            for entry in json.loads(f.read_text())["requests"]:
                # a request that was applied stays applied, whatever its duplicates' fate
                if out.get(entry["request_id"], {}).get("status") != "applied":
                    out[entry["request_id"]] = {**entry, "run_id": f.name[:-5]}
        return out

    def write(self, plan: Plan, version: int | None) -> None:
        _create(self.entry(plan.run_id), {
            "run_id": plan.run_id, "settled": _now(), "version": version,
            "requests": [{"request_id": r["request_id"], "data_id": r["data_id"], "status": r["status"],
                          "reason": r["reason"]} for r in plan.requests]})


def settled(requests: str | Location, ledger: str | Location | None = None) -> dict[str, dict]:
    """request_id → ledger entry, for every request a finished run settled."""
    return Ledger(requests, ledger).settled()


# -- the lease -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LeaseSettings:
    """How a run takes the lease on an output prefix.

    Fields:
      ttl_s:  how long the lease lasts without renewal (renewed every ttl_s / 3 while working)
      wait_s: how long to wait for a live lease held by another run (0: give up at once)
      holder: this run's name in the lease (default: host:pid:random); a lease held by the same
        name is taken over at once (a rerun of the same job after a crash)
    """

    ttl_s: float = 300.0
    wait_s: float = 0.0
    holder: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.ttl_s, (int, float)) and self.ttl_s >= 1):
            raise InputError(f"lease ttl_s must be a number >= 1, got {self.ttl_s!r}")
        if not (isinstance(self.wait_s, (int, float)) and self.wait_s >= 0):
            raise InputError(f"lease wait_s must be a number >= 0, got {self.wait_s!r}")


class LeaseBusy(Exception):
    """Another run holds the lease: nothing was done."""

    def __init__(self, uri: str, holder: str, expires: str) -> None:
        super().__init__(f"{uri}: another run holds the lease ({holder}, until {expires}); nothing done")
        self.holder, self.expires = holder, expires


class LeaseLost(StorageError):
    """The lease expired or was taken over while this run worked: it stopped at a step boundary."""


class Lease:
    """The lease on an output prefix (``_lease.json``): acquire, renew in the background, release."""

    def __init__(self, output: str | Location, settings: LeaseSettings = LeaseSettings()) -> None:
        self.loc = location(output).join(LEASE)
        self.settings = settings
        self.holder = settings.holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.expires_at = 0.0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _record(self, acquired: str, released: bool = False) -> bytes:
        return _json({"holder": self.holder, "token": self.token, "acquired": acquired, "renewed": _now(),
                      "expires": _iso(self.expires_at), "expires_at": self.expires_at,
                      "host": socket.gethostname(), "pid": os.getpid(), "released": released})

    def acquire(self) -> Lease:
        """Take the lease, waiting up to ``wait_s`` for a live one; raises :class:`LeaseBusy`."""
        deadline = time.time() + self.settings.wait_s
        while True:
            current = self.loc.read_versioned()
            now = time.time()
            self.expires_at = now + self.settings.ttl_s
            self._acquired = _now()
            try:
                if current is None:
                    self.etag = self.loc.create(self._record(self._acquired))
                    break
                rec = json.loads(current[0])
                if rec.get("released") or rec.get("expires_at", 0) < now or rec.get("holder") == self.holder:
                    self.etag = self.loc.replace(self._record(self._acquired), if_match=current[1])
                    break
            except Conflict:
                continue  # another run moved first: look again
            if now >= deadline:
                raise LeaseBusy(self.loc.parent().uri, rec.get("holder", "?"), rec.get("expires", "?"))
            time.sleep(max(0.05, min(1.0, deadline - now, rec.get("expires_at", now) - now + 0.05)))
        self._thread = threading.Thread(target=self._renew_loop, name="erasure-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.settings.ttl_s / 3):
            try:
                self.renew()
            except Conflict:
                self.lost = "taken over by another run"
                return
            except StorageError:
                continue  # transient: the next tick tries again; check() sees the expiry

    def renew(self) -> None:
        with self._lock:
            if self.lost or self._stop.is_set():
                return
            self.expires_at = time.time() + self.settings.ttl_s
            self.etag = self.loc.replace(self._record(self._acquired), if_match=self.etag)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is no longer this run's (called between steps)."""
        if self.lost:
            raise LeaseLost(f"{self.loc.uri}: the lease was {self.lost} while this run worked; stopped "
                            "(a later run resumes the open plan)")
        if time.time() > self.expires_at:
            raise LeaseLost(f"{self.loc.uri}: the lease expired at {_iso(self.expires_at)} (renewals failed); "
                            "stopped (a later run resumes the open plan)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.lost or self.etag is None:
                return
            try:
                self.loc.replace(self._record(self._acquired, released=True), if_match=self.etag)
            except Conflict:
                pass  # taken over already
            self.etag = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lease(output: str | Location) -> dict | None:
    """The lease record of ``output`` with ``live`` (held and not expired), or None if never taken."""
    cur = location(output).join(LEASE).read_versioned()
    if cur is None:
        return None
    rec = json.loads(cur[0])
    rec["live"] = not rec.get("released") and rec.get("expires_at", 0) >= time.time()
    rec.pop("token", None)
    return rec


# -- versions, plans and markers -------------------------------------------------------------------------

@dataclass
class Plan:
    """What one run does, written before it does it (``plans/<run>.json``).

    ``parent`` is the version the run builds on: {version, run_id, uri, key, model_sha256, etag},
    ``etag`` being that of ``LATEST.json`` when the run planned (None: nothing published yet).
    """

    run_id: str
    created: str
    version: int
    parent: dict
    delete_ids: list[int]
    requests: list[dict]                 # Request fields, with status and reason decided
    deltagrad: dict = field(default_factory=dict)
    verify: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # {requests, ledger}: where they were read

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Registry:
    """Versions, plans, markers and audit records under ``output``."""

    def __init__(self, output: str | Location) -> None:
        self.root = location(output)

    # -- the published version
    def read_latest(self) -> tuple[dict | None, str | None]:
        """LATEST.json and its ETag (None, None when nothing was published)."""
        cur = self.root.join(LATEST).read_versioned()
        return (None, None) if cur is None else (json.loads(cur[0]), cur[1])

    def latest(self) -> dict | None:
        return self.read_latest()[0]

    def publish(self, record: dict, etag: str | None) -> None:
        """Make ``record`` the published version, only if LATEST.json is still at ``etag``
        (``None``: only if nothing was published). Raises :class:`Conflict` otherwise."""
        loc = self.root.join(LATEST)
        if etag is None:
            loc.create(_json(record))
        else:
            loc.replace(_json(record), if_match=etag)

    def version_file(self, version: int) -> Location:
        return self.root.join("versions", f"{version:04d}.json")

    def version_record(self, version: int, latest: dict | None) -> dict | None:
        """The published record of ``version`` (from LATEST or ``versions/``), None if unpublished."""
        if latest is not None and latest.get("version") == version:
            return latest
        if latest is None or latest.get("version", -1) < version:
            return None
        loc = self.version_file(version)
        return json.loads(loc.read_text()) if loc.exists() else None

    def record_version(self, record: dict) -> None:
        """The version's entry in the lineage (create-only; done once per version)."""
        if record is not None and not self.version_file(int(record["version"])).exists():
            _create(self.version_file(int(record["version"])), {k: v for k, v in record.items() if k != "touched"})

    def lineage(self) -> list[dict]:
        """Every published version, newest first."""
        latest = self.latest()
        out = [latest] if latest else []
        for f in reversed(self.root.join("versions").list()):
            rec = json.loads(f.read_text())
            if not latest or rec["version"] < latest["version"]:
                out.append(rec)
        return out

    def resolve(self, record: dict) -> Location:
        """The cache a version record names (``key`` below ``output``, else its URI)."""
        if record.get("key"):
            return self.root.join(record["key"])
        return location(record["cache"])

    # -- plans and markers
    def plan_file(self, run_id: str) -> Location:
        return self.root.join("plans", f"{run_id}.json")

    def plan_ids(self) -> list[str]:
        """Every run that wrote a plan, oldest first (run ids start with their UTC time)."""
        return sorted(f.name[:-5] for f in self.root.join("plans").list() if f.name.endswith(".json"))

    def plan(self, run_id: str) -> Plan:
        return Plan.from_dict(json.loads(self.plan_file(run_id).read_text()))

    def plans(self, skip: set[str] = frozenset()) -> list[Plan]:
        """The plans (oldest first), read except those of the runs in ``skip``."""
        return [self.plan(r) for r in self.plan_ids() if r not in skip]

    def run_file(self, run_id: str, name: str) -> Location:
        return self.root.join("runs", run_id, name)

    def closed(self) -> dict[str, dict]:
        return {f.name[:-5]: json.loads(f.read_text()) for f in self.root.join("closed").list()
                if f.name.endswith(".json")}

    def is_closed(self, run_id: str) -> bool:
        return self.root.join("closed", f"{run_id}.json").exists()

    def close(self, plan: Plan, reason: str, detail: str) -> bool:
        """Mark a run as never to publish (create-only); False if it was closed already."""
        return _create(self.root.join("closed", f"{plan.run_id}.json"),
                       {"run_id": plan.run_id, "reason": reason, "detail": detail, "closed": _now()})

    def committed(self, run_id: str, kind: str) -> Location | None:
        """A committed cache of this run's ``kind`` (cache, exact), from any attempt."""
        for f in self.root.join("runs", run_id).list(recursive=True):
            if f.name == MANIFEST and f.parent().name.startswith(kind + "-"):
                return f.parent()
        return None

    def new_attempt(self, run_id: str, kind: str) -> Location:
        """A fresh directory for one attempt at writing a cache: whatever an earlier attempt left
        half-written stays where it is and blocks nothing."""
        return self.root.join("runs", run_id, f"{kind}-{uuid.uuid4().hex[:8]}")

    def audit_file(self, plan: Plan, suffix: str = "") -> Location:
        return self.root.join("audit", f"{plan.created.replace(':', '')}-{plan.run_id}{suffix}.json")


def _model_sha(cache: Cache) -> str:
    return cache.manifest.model_sha256()


def _key(loc: Location, reg: Registry) -> str | None:
    return loc.relative_to(reg.root)


def version_record(reg: Registry, cache: Cache, *, version: int, run_id: str, parent: dict | None,
                   method: str, applied: int = 0) -> dict:
    """The record LATEST.json and ``versions/NNNN.json`` hold for one published version."""
    return {"version": version, "run_id": run_id, "cache": cache.root.portable_uri, "key": _key(cache.root, reg),
            "model_sha256": _model_sha(cache), "cache_run_id": cache.manifest.run_id, "method": method,
            "parent": parent, "applied": applied, "published": _now()}


def publish_initial(cache: str | Location | Cache, output: str | Location) -> dict:
    """Publish a trained cache as version 0 of ``output`` (its first LATEST.json).

    Downstream jobs then name ``output`` and read whatever version is published. Refused (a
    :class:`~.store.location.Conflict`) if ``output`` has published a version already.

    Returns:
      The version record.
    """
    reg = Registry(output)
    c = cache if isinstance(cache, Cache) else open_cache(cache)
    latest = reg.latest()
    if latest is not None:
        raise Conflict(f"{reg.root.uri}: version {latest['version']} is published already; publish version 0 "
                       "of a new model under a new output prefix")
    record = version_record(reg, c, version=0, run_id=f"train-{c.manifest.run_id}", parent=None,
                            method="train")
    try:
        reg.publish(record, None)
    except Conflict:
        raise Conflict(f"{reg.root.uri}: a version was published meanwhile; not replaced") from None
    reg.record_version(record)
    return record


def resolve_cache(uri: str | Location) -> Location:
    """The cache a location means: itself if it holds a cache, the published version if it is a
    models prefix (its LATEST.json); anything else as is, for :func:`~.store.cache.open_cache` to
    explain."""
    loc = location(uri)
    if loc.join(MANIFEST).exists():
        return loc
    latest = Registry(loc).latest()
    return loc if latest is None else Registry(loc).resolve(latest)


# -- planning ---------------------------------------------------------------------------------------------

def plan_erasure(reg: Registry, ledger: Ledger, base_cache: str | Location | None, requests_prefix: str | Location,
                 config: DeltaGradConfig, verify: dict, data: str | Location | None,
                 latest: dict | None, etag: str | None) -> Plan | None:
    """Validate and de-duplicate the pending requests against the current version (``latest``,
    read with ``etag``); write the plan (create-only). None if nothing pends."""
    done = ledger.settled()
    rows = [r for r in read_requests(requests_prefix) if r.request_id not in done]
    if not rows:
        return None
    if latest is not None:
        parent_loc = reg.resolve(latest)
    elif base_cache is not None:
        parent_loc = location(base_cache)
    else:
        raise InputError(f"{reg.root.uri} has no published version and no cache was given: set `cache` "
                         "(the first version's cache) or publish one (train with `publish`)")
    parent = open_cache(parent_loc)
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
    version = (latest["version"] if latest else 0) + 1
    parent_info = {"uri": parent.root.portable_uri, "key": _key(parent.root, reg),
                   "run_id": latest["run_id"] if latest else None, "cache_run_id": parent.manifest.run_id,
                   "version": version - 1, "model_sha256": _model_sha(parent), "etag": etag}
    plan = Plan(run_id, _now(), version, parent_info, sorted(to_delete), [asdict(r) for r in rows],
                config.to_dict(), {**dict(verify), "data": None if data is None else location(data).portable_uri},
                {"requests": location(requests_prefix).portable_uri, "ledger": ledger.root.portable_uri})
    reg.plan_file(run_id).create(_json(asdict(plan)))
    return plan


def _parent_location(reg: Registry, plan: Plan) -> Location:
    return reg.root.join(plan.parent["key"]) if plan.parent.get("key") else location(plan.parent["uri"])


def _next_plan(reg: Registry, ledger: Ledger, base_cache, requests_prefix, config, verify, data) -> Plan | None:
    """The plan to carry on next: one published but not settled, an open one whose parent is
    still LATEST, or a new one for the pending requests. Open plans that can no longer publish
    are closed on the way."""
    latest, etag = reg.read_latest()
    reg.record_version(latest)  # the lineage holds the current version before anything builds on it
    done, closed = ledger.runs(), reg.closed()
    for plan in reg.plans(skip=done | set(closed)):
        rec = reg.version_record(plan.version, latest)
        if rec is not None and rec.get("run_id") == plan.run_id:
            return plan  # published: its record, audit and ledger entry remain
        if plan.parent.get("etag") == etag:
            return plan  # built on the current version: carry it on
        moved = f"version {latest['version']} (run {latest['run_id']})" if latest else "a new version"
        if reg.close(plan, "superseded", f"LATEST moved to {moved} before this run published; its requests "
                                         "were planned again on top of it"):
            _closed_audit(reg, plan, "superseded")
    return plan_erasure(reg, ledger, base_cache, requests_prefix, config, verify, data, latest, etag)


# -- carrying a plan through --------------------------------------------------------------------------------

def _check(lease: Lease | None) -> None:
    if lease is not None:
        lease.check()


def _replay(reg: Registry, plan: Plan, parent: Cache) -> tuple[Location, dict]:
    """The run's DeltaGrad cache: committed by an earlier attempt, or replayed now into a fresh one."""
    from . import api
    done = reg.committed(plan.run_id, "cache")
    if done is not None:
        return done, {"resumed": True}
    target = reg.new_attempt(plan.run_id, "cache")
    res = api.unlearn(parent, delete=plan.delete_ids, config=DeltaGradConfig.from_dict(plan.deltagrad),
                      out_cache=target, note={"erasure_run": plan.run_id}, data=plan.verify.get("data"))
    return target, res.diagnostics()


def _result(reg: Registry, plan: Plan, lease: Lease | None) -> dict:
    """The run's result.json: read, or computed (replay → verify) and written once."""
    loc = reg.run_file(plan.run_id, "result.json")
    cur = loc.read_versioned()
    if cur is not None:
        return json.loads(cur[0])
    if not plan.delete_ids:
        result: dict = {"new_version": None, "note": "no valid request: nothing to erase"}
    else:
        parent = open_cache(_parent_location(reg, plan))
        t = time.perf_counter()
        target, diag = _replay(reg, plan, parent)
        new = open_cache(target)
        result = {"new_version": plan.version, "deltagrad_cache": new.root.portable_uri,
                  "deltagrad_key": _key(new.root, reg), "deltagrad_sha256": _model_sha(new), "diagnostics": diag,
                  "deltagrad_s": time.perf_counter() - t}
        _check(lease)
        result.update(_verify(parent, new, plan, reg))
    if not _create(loc, result):  # a twin run of the same plan wrote it first: use theirs
        result = json.loads(loc.read_text())
    return result


def execute(reg: Registry, ledger: Ledger, plan: Plan, lease: Lease | None = None) -> dict | None:
    """Carry a plan through; each step is skipped when its marker says it was done.

    Steps: replay into a fresh attempt directory (marker: a committed manifest) → verify →
    ``result.json`` → publish by compare-and-swap on LATEST.json → ``versions/NNNN.json`` → the
    audit record → the ledger entry. Returns the audit record, or None if the run lost the race to
    publish (its plan is closed as superseded, its requests pend again).
    """
    t0 = time.perf_counter()
    latest, _ = reg.read_latest()
    rec = reg.version_record(plan.version, latest)
    published = rec is not None and rec.get("run_id") == plan.run_id
    result = _result(reg, plan, lease)
    _check(lease)
    if result["new_version"] is not None and not published:
        if reg.is_closed(plan.run_id):
            return None  # abandoned while it worked
        new = open_cache(_published_location(reg, result))
        rec = version_record(reg, new, version=plan.version, run_id=plan.run_id, method=result["method"],
                             parent={k: plan.parent.get(k) for k in ("version", "run_id", "model_sha256")},
                             applied=sum(r["status"] == "applied" for r in plan.requests))
        try:
            reg.publish(rec, plan.parent.get("etag"))
        except Conflict:
            latest, _ = reg.read_latest()
            got = reg.version_record(plan.version, latest)
            if got is None or got.get("run_id") != plan.run_id:
                moved = f"version {latest['version']} (run {latest['run_id']})" if latest else "another version"
                if reg.close(plan, "superseded", f"LATEST moved to {moved} before this run published; its "
                                                 "requests were planned again on top of it"):
                    _closed_audit(reg, plan, "superseded")
                return None
            rec = got  # a twin run of this plan published it
    if rec is not None and result["new_version"] is not None:
        reg.record_version(rec)
    audit = _audit(reg, plan, result, rec if result["new_version"] is not None else None, time.perf_counter() - t0,
                   lease)
    if not _create(reg.audit_file(plan), audit):
        audit = json.loads(reg.audit_file(plan).read_text())
    ledger.write(plan, plan.version if result["new_version"] is not None else None)
    return audit


def _published_location(reg: Registry, result: dict) -> Location:
    if result.get("published_key"):
        return reg.root.join(result["published_key"])
    return location(result["published"])


def _counts(plan: Plan) -> dict:
    counts: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in plan.requests:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        if r["reason"]:
            key = _reason_kind(r["reason"])
            reasons[key] = reasons.get(key, 0) + 1
    return {"received": len(plan.requests), **counts, "rejected_by_reason": reasons,
            "request_ids": [r["request_id"] for r in plan.requests]}


def _audit(reg: Registry, plan: Plan, result: dict, rec: dict | None, seconds: float, lease: Lease | None) -> dict:
    parent = {k: plan.parent.get(k) for k in ("version", "run_id", "uri", "model_sha256")}
    return {"run_id": plan.run_id, "created": plan.created, "finished": _now(), "outcome": "published" if rec
            else "settled", "parent": parent,
            "new": None if rec is None else {"version": rec["version"], "cache": rec["cache"],
                                             "model_sha256": rec["model_sha256"], "method": rec["method"]},
            "requests": _counts(plan),
            "rejected": [{"request_id": r["request_id"], "data_id": r["data_id"], "source": r["source"],
                          "reason": r["reason"]} for r in plan.requests if r["status"] == "rejected"],
            "deleted_ids": len(plan.delete_ids), "verification": result.get("verification"),
            "diagnostics": result.get("diagnostics"), "lease_holder": lease.holder if lease else None,
            "timings": {"deltagrad_s": result.get("deltagrad_s"),
                        "exact_s": (result.get("verification") or {}).get("exact_s"), "run_s": seconds}}


def _closed_audit(reg: Registry, plan: Plan, outcome: str, detail: dict | None = None) -> dict:
    """The audit record of a run that will not publish: its requests are pending again."""
    audit = {"run_id": plan.run_id, "created": plan.created, "finished": _now(), "outcome": outcome,
             "parent": {k: plan.parent.get(k) for k in ("version", "run_id", "uri", "model_sha256")}, "new": None,
             "requests": {"received": len(plan.requests), "returned_to_pending": len(plan.requests),
                          "request_ids": [r["request_id"] for r in plan.requests]}, "rejected": [],
             "deleted_ids": 0, "verification": None, "diagnostics": None, **(detail or {}),
             "timings": {"deltagrad_s": None, "exact_s": None, "run_s": 0.0}}
    _create(reg.audit_file(plan, f"-{outcome}"), audit)
    return audit


def _reason_kind(reason: str) -> str:
    """The kind of a rejection, for counts: 'unknown data_id', 'malformed data_id', 'duplicate request_id', …"""
    for kind in ("unknown data_id", "malformed data_id", "duplicate request_id", "already erased",
                 "missing request_id", "unreadable file"):
        if kind in reason:
            return kind
    return "malformed row"


def _verify(parent: Cache, new: Cache, plan: Plan, reg: Registry) -> dict:
    """Check the new model against exact retraining on a sample of runs (``verify.sample`` ∈ [0, 1]).

    If DeltaGrad is off by more than ``verify.tolerance`` (relative to the change's own effect),
    the exact retraining is published instead — recorded as a cache of its own, so that later
    erasures replay from it. Returns the verification and what to publish.
    """
    from . import api
    sample, tol = float(plan.verify.get("sample", 0)), float(plan.verify.get("tolerance", 0.05))
    if not (0 <= sample <= 1):
        raise InputError(f"verify.sample must be in [0, 1], got {sample}")
    out = {"published": new.root.portable_uri, "published_key": _key(new.root, reg),
           "published_sha256": _model_sha(new), "method": "deltagrad"}
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
        target = reg.committed(plan.run_id, "exact")
        if target is None:
            target = reg.new_attempt(plan.run_id, "exact")
            api.retrain_exact(parent, delete=plan.delete_ids, out_cache=target, data=data,
                              note={"erasure_run": plan.run_id})
        exact_cache = open_cache(target)
        out.update(published=exact_cache.root.portable_uri, published_key=_key(exact_cache.root, reg),
                   published_sha256=_model_sha(exact_cache), method="exact-retrain")
    return out


def bulk_erasure(*, cache: str | Location | None = None, requests: str | Location, output: str | Location,
                 config: DeltaGradConfig = DeltaGradConfig(), verify: dict | None = None,
                 data: str | Location | None = None, ledger: str | Location | None = None,
                 lease: LeaseSettings | None = LeaseSettings(), max_runs: int = 20) -> list[dict]:
    """Take the lease, finish any open run, then apply the pending requests (planning again while
    more arrive, up to ``max_runs`` runs). Returns the audit record of each run done.

    Args:
      cache: the first version's cache (used until ``output`` has published one).
      requests: the prefix holding request files (and, by default, the ledger under ``_done/``).
      output: where versions, plans, markers, the lease and audit records go.
      config: DeltaGrad settings.
      verify: ``{sample, tolerance}``: the fraction of runs checked against exact retraining, and
        the error (relative to the erasure's effect) above which the exact model is published.
      data: the training data, if not at the location recorded in the cache.
      ledger: the ledger's prefix (default ``requests/_done``).
      lease: how to take the lease (None: do not take it — correctness still holds, by
        compare-and-swap, but concurrent runs would duplicate work).
      max_runs: the most runs (plans) carried through in one call.

    Raises:
      LeaseBusy: another run holds the lease (and did not release it within ``lease.wait_s``).
      LeaseLost: the lease expired or was taken over mid-run (stopped between two steps).
    """
    reg, led = Registry(output), Ledger(requests, ledger)
    held = Lease(reg.root, lease).acquire() if lease is not None else None
    try:
        audits: list[dict] = []
        for _ in range(max_runs):
            _check(held)
            plan = _next_plan(reg, led, cache, requests, config, verify or {}, data)
            if plan is None:
                break
            audit = execute(reg, led, plan, held)
            if audit is not None:
                audits.append(audit)
        return audits
    finally:
        if held is not None:
            held.release()


# -- the operator's view -------------------------------------------------------------------------------------

def status(output: str | Location, requests: str | Location | None = None,
           ledger: str | Location | None = None) -> dict:
    """Where an erasure output stands: the published version and its lineage, open plans, the
    lease, and how many requests pend.

    Args:
      output: the erasure output prefix.
      requests, ledger: where requests and the ledger are (default: as the latest plan recorded).

    Returns:
      A dict: ``published``, ``lineage`` (newest first), ``open_plans``, ``closed``, ``lease``,
      ``pending`` (None when the requests prefix is unknown).
    """
    reg = Registry(output)
    latest, etag = reg.read_latest()
    ids = reg.plan_ids()
    if requests is None and ids:
        last = reg.plan(ids[-1])
        requests = last.sources.get("requests")
        ledger = ledger if ledger is not None else last.sources.get("ledger")
    led = Ledger(requests, ledger) if requests is not None else None
    done = led.runs() if led is not None else set()
    closed = reg.closed()
    plans = reg.plans(skip=done | set(closed))
    open_plans = []
    for p in plans:
        rec = reg.version_record(p.version, latest)
        state = ("published, not yet settled" if rec is not None and rec.get("run_id") == p.run_id
                 else "resumable" if p.parent.get("etag") == etag else "stale: will be closed as superseded")
        open_plans.append({"run_id": p.run_id, "created": p.created, "version": p.version,
                           "parent_version": p.parent.get("version"), "requests": len(p.requests),
                           "delete_ids": len(p.delete_ids), "state": state,
                           "result": reg.run_file(p.run_id, "result.json").exists()})
    pending = None
    if led is not None:
        taken = led.settled()
        in_open = {r["request_id"] for p in plans for r in p.requests}
        pending = sum(1 for r in {r.request_id for r in read_requests(requests)} if r not in taken and r not in in_open)
    lineage = [{k: r.get(k) for k in ("version", "run_id", "method", "applied", "published", "model_sha256")}
               | {"parent_version": (r.get("parent") or {}).get("version")} for r in reg.lineage()]
    return {"output": reg.root.uri, "published": None if latest is None else
            {k: latest.get(k) for k in ("version", "run_id", "cache", "method", "model_sha256", "published")},
            "lineage": lineage, "open_plans": open_plans,
            "closed": [{"run_id": k, "reason": v["reason"], "closed": v["closed"]} for k, v in sorted(closed.items())],
            "lease": read_lease(reg.root), "pending": pending}


def abandon(run_id: str, output: str | Location, *, reason: str = "abandoned by an operator",
            requests: str | Location | None = None, ledger: str | Location | None = None,
            lease: LeaseSettings = LeaseSettings()) -> dict:
    """Abandon an open plan: it will never publish, and its requests pend again (recorded in the audit).

    Takes the lease (so no run works meanwhile) and moves LATEST.json's ETag (rewriting the same
    version with a ``touched`` note), so that a run still carrying the plan somewhere can no
    longer publish it. A plan already published or settled cannot be abandoned.

    Returns:
      The audit record of the abandon.
    """
    reg = Registry(output)
    loc = reg.plan_file(run_id)
    if not loc.exists():
        raise InputError(f"{reg.root.uri}: no plan {run_id!r}; `erasure status` lists the open plans")
    plan = Plan.from_dict(json.loads(loc.read_text()))
    led = Ledger(requests if requests is not None else plan.sources.get("requests"),
                 ledger if ledger is not None else plan.sources.get("ledger"))
    with Lease(reg.root, lease) as held:
        latest, etag = reg.read_latest()
        rec = reg.version_record(plan.version, latest)
        if rec is not None and rec.get("run_id") == run_id:
            raise InputError(f"run {run_id} published version {plan.version}; a published erasure cannot be "
                             "abandoned (its requests are out of the model)")
        if led.entry(run_id).exists():
            raise InputError(f"run {run_id} is settled already (ledger {led.entry(run_id).uri}); nothing to abandon")
        if reg.is_closed(run_id):
            raise InputError(f"run {run_id} is closed already ({reg.closed()[run_id]['reason']})")
        if latest is not None and plan.parent.get("etag") == etag:
            # the plan could still publish: move LATEST's ETag so that it cannot
            reg.publish({**latest, "touched": {"at": _now(), "by": f"abandon {run_id}"}}, etag)
        reg.close(plan, "abandoned", reason)
        return _closed_audit(reg, plan, "abandoned", {"reason": reason, "lease_holder": held.holder})


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
    """A data id as a salted hash (``h:`` + 12 hex digits); None stays None."""
    if data_id is None:
        return "—"
    return "h:" + hashlib.sha256(salt + str(data_id).encode()).hexdigest()[:12]
