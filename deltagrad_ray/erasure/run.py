"""One model's erasure: plan the pending requests, replay, check, publish, settle, audit.

The protocol (per model output prefix). Every object but ``_lease.json`` and ``LATEST.json`` is
written once, create-only (``If-None-Match: *`` on S3, ``os.link`` locally): plans, results,
version records, ledger entries and audit records are an append-only history, and a step whose
object exists is done.

* **Lease** (:mod:`.lease`): one run at a time works on an output; correctness does not depend on it.
* **Publishing by compare-and-swap.** A plan records the ETag of ``LATEST.json`` it read; the new
  version is that version + 1, its parent that version, and ``LATEST.json`` changes only with
  ``If-Match`` on that ETag. A run that loses (another run published first) closes its plan as
  superseded and plans again on top of the new version, so a model that lacks an erasure already
  published is never published. Before publishing, the new cache must have removed every id that
  any earlier version erased (a model never again holds an erased row).
* **Markers.** A run resumes from whatever it finds: an open plan whose parent is still LATEST is
  carried on (its committed cache reused, or replayed again in a fresh attempt directory, so a
  partial write never blocks it); a plan published but not settled gets its version record, audit
  and ledger entry; an open plan whose parent is no longer LATEST is closed. Each request is
  settled in the model's ledger only after its version is published: it is applied exactly once.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..core.config import DeltaGradConfig
from ..core.errors import InputError
from ..store.cache import Cache, open_cache
from ..store.location import Conflict, Location, StorageError, location, stored_location
from ..store.records import Damaged, Fields, create, decode
from ..store.registry import Registry, VersionRecord, now, publish_initial
from .lease import Lease, LeaseSettings, check
from .ledger import Ledger, pending_rows, settlements
from .plan import Plan, PlanParent, ReconcileSettings, Runs, Settled, VerifySettings, new_run_id
from .requests import LEGACY_LEDGER, Inbox, read_inbox


@dataclass(frozen=True)
class Target:
    """One model of a fleet, as its erasure needs it (checked when built).

    Fields:
      name:      how reports and receipts name it
      output:    its models prefix (versions, plans, ledger, audit)
      cache:     its first version's cache, used until ``output`` has published one
      data:      its training data, when not at the location its caches record
      ledger:    a ledger prefix of an older version of this project to honour (read only)
      deltagrad: the replay settings
      num_cpus, num_gpus, resources: what its task asks Ray for
    """

    name: str
    output: str
    cache: str | None = None
    data: str | None = None
    ledger: str | None = None
    deltagrad: DeltaGradConfig = field(default_factory=DeltaGradConfig)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict = field(default_factory=dict)

    @classmethod
    def for_output(cls, output: str) -> Target:
        """The model at a models prefix alone (named after its last path part), with default settings."""
        loc = location(output)
        return cls(loc.name or "model", loc.portable_uri)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > 100:
            raise InputError(f"a model's name must be a non-empty string of at most 100 characters, got {self.name!r}")
        for what, v in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"model {self.name}: {what} must be a finite number >= 0, got {v!r}")
        for k, v in self.resources.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"model {self.name}: resource {k!r} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.deltagrad, DeltaGradConfig):
            raise InputError(f"model {self.name}: deltagrad must be a DeltaGradConfig")


@dataclass(frozen=True)
class Settings:
    """What every model's erasure run shares (checked when built).

    Fields:
      verify:   sampled verification (:class:`~.plan.VerifySettings`)
      lease:    how to take each output's lease (None: do not; correctness still holds)
      max_runs: the most runs (plans) carried through per model in one call
      retention: what to prune after each run (None: nothing; :mod:`.retention`)
      reconcile: when to publish an exact retraining instead (:class:`~.plan.ReconcileSettings`)
    """

    verify: VerifySettings = field(default_factory=VerifySettings)
    lease: LeaseSettings | None = field(default_factory=LeaseSettings)
    max_runs: int = 20
    retention: object | None = None
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)

    def __post_init__(self) -> None:
        if isinstance(self.max_runs, bool) or not isinstance(self.max_runs, int) or self.max_runs < 1:
            raise InputError(f"max_runs must be an integer >= 1, got {self.max_runs!r}")


class _Model:
    """A target's stores: registry, plans and markers, ledger."""

    def __init__(self, target: Target, inbox: str) -> None:
        self.target = target
        self.inbox = inbox
        self.reg = Registry(target.output)
        self.runs = Runs(target.output)
        legacy = [location(inbox).join(LEGACY_LEDGER)] + ([target.ledger] if target.ledger else [])
        self.ledger = Ledger(target.output, legacy)


# -- planning ---------------------------------------------------------------------------------------------

def _base_version(m: _Model) -> None:
    """Before the first erasure: the first cache becomes version 0 of the output (its lineage starts
    with the model that holds every row, which receipts and retention need)."""
    if m.reg.latest() is not None:
        return
    if m.target.cache is None:
        raise InputError(f"{m.reg.root.uri} has no published version and no cache was given: set `cache` "
                         "(the first version's cache) or publish one (train with `publish`)")
    try:
        publish_initial(m.target.cache, m.reg.root)
    except Conflict:
        pass  # another run published it meanwhile


def _since_exact(m: _Model, latest: VersionRecord) -> tuple[VersionRecord, int]:
    """The last exact version of the lineage (trained, or an exact retraining) and the replays since."""
    n = 0
    for rec in m.reg.lineage():
        if rec.method != "deltagrad":
            return rec, n
        n += 1
    return latest, n  # a lineage of replays only (its first version written before version 0 was)


def plan_erasure(m: _Model, inbox: Inbox, latest: VersionRecord, etag: str, open_plans: Sequence[Plan] = (),
                 reconcile: ReconcileSettings | None = None) -> Plan | None:
    """Decide every pending request's fate against the published version (``latest``, read with
    ``etag``) and write the plan (create-only). None if nothing pends."""
    done = settlements(m.ledger, m.runs, m.reg, latest)
    rows = pending_rows(inbox.requests, done, [r for p in open_plans for r in p.requests])
    if not rows:
        return None
    parent = m.reg.open(latest)
    ids, removed = parent.row_ids(m.target.data)
    held = set(ids.tolist())
    erased = set(ids[removed].tolist())
    seen: dict = {}
    fates: list[Settled] = []
    to_delete: set[int] = set()
    for r in rows:
        if not r.valid:
            fates.append(Settled(r.request_id, r.data_id, r.timestamp, r.source, "rejected", r.problem))
            continue
        if r.key in seen:
            fates.append(Settled(r.request_id, r.data_id, r.timestamp, r.source, "duplicate",
                                 f"the same request as {seen[r.key]} in this batch"))
            continue
        seen[r.key] = r.source
        s = done.by_key.get(r.key)
        if s is not None:
            fates.append(Settled(r.request_id, r.data_id, r.timestamp, r.source, "duplicate",
                                 f"settled before by run {s.run_id} ({s.status})"))
        elif r.data_id not in held:
            fates.append(Settled(r.request_id, r.data_id, r.timestamp, r.source, "not present",
                                 f"data_id {r.data_id} is not in this model's training data"))
        elif r.data_id in erased:
            fates.append(Settled(r.request_id, r.data_id, r.timestamp, r.source, "already erased",
                                 f"data_id {r.data_id} was erased in an earlier version"))
        else:
            fates.append(Settled(r.request_id, r.data_id, r.timestamp, r.source, "applied"))
            to_delete.add(r.data_id)
    run_id = new_run_id()
    method = "deltagrad"
    if reconcile is not None and reconcile.every_versions is not None and to_delete:
        _, replays = _since_exact(m, latest)
        if replays + 1 >= reconcile.every_versions:
            method = "exact-retrain"  # reconciliation by count: the chain would reach every_versions replays
    p = PlanParent(latest.version, latest.run_id, parent.root.portable_uri, latest.key, latest.model_sha256,
                   parent.manifest.run_id, etag)
    plan = Plan(run_id, now(), m.target.name, latest.version + 1, p, tuple(sorted(to_delete)), tuple(fates),
                m.target.deltagrad.to_dict(), {}, m.target.data, inbox.uri, method)
    m.runs.write_plan(plan)
    return plan


def _next_plan(m: _Model, inbox: Inbox, settings: Settings) -> Plan | None:
    """The plan to carry on next: one published but not settled, an open one whose parent is
    still LATEST, or a new one for the pending requests. Open plans that can no longer publish
    are closed on the way."""
    _base_version(m)
    latest, etag = m.reg.read_latest()
    m.reg.record_version(latest)  # the lineage holds the current version before anything builds on it
    done = settlements(m.ledger, m.runs, m.reg, latest)
    closed = m.runs.closed()
    for plan in m.runs.plans(skip=set(done.runs) | set(closed)):
        rec = m.reg.version_record(plan.version, latest)
        if rec is not None and rec.run_id == plan.run_id:
            return plan  # published: its record, audit and ledger entry remain
        if plan.parent.etag == etag:
            return plan  # built on the current version: carry it on
        if m.runs.close(plan, "superseded", f"LATEST moved to version {latest.version} (run {latest.run_id}) "
                                            "before this run published; its requests were planned again on top"):
            _closed_audit(m, plan, "superseded")
    return plan_erasure(m, inbox, latest, etag, reconcile=settings.reconcile)


# -- carrying a plan through --------------------------------------------------------------------------------

def _parent(m: _Model, plan: Plan) -> Cache:
    """The plan's parent cache, its model checked against the plan."""
    loc = m.reg.root.join(plan.parent.key) if plan.parent.key else stored_location(plan.parent.uri,
                                                                                    relative_to=m.reg.root)
    cache = open_cache(loc)
    if cache.manifest.model_sha256() != plan.parent.model_sha256:
        raise Damaged(f"{loc.uri}: the cache's model is not the one plan {plan.run_id} was made on (sha256 "
                      f"{plan.parent.model_sha256[7:19]}…): the cache was changed; abandon the plan with "
                      f"`deltagrad-ray erasure abandon {plan.run_id} --output {m.reg.root.uri}`")
    return cache


def _replay(m: _Model, plan: Plan, parent: Cache) -> tuple[Location, bool]:
    """The run's DeltaGrad cache, and whether an earlier attempt committed it (else it is replayed now
    into a fresh one). Either way its diagnostics are read back from its change log
    (:func:`_logged_diagnostics`), so a resumed run states what an uninterrupted one does."""
    from .. import api
    done = m.runs.committed(plan.run_id, "cache")
    if done is not None:
        return done, True
    target = m.runs.new_attempt(plan.run_id, "cache")
    api.unlearn(parent, delete=list(plan.delete_ids), config=DeltaGradConfig.from_dict(plan.deltagrad),
                out_cache=target, note={"erasure_run": plan.run_id}, data=plan.data)
    return target, False


_LOGGED = {"steps": int, "explicit_steps": int, "approx_steps": int, "fallbacks": int, "skipped_pairs": int,
           "prediction_error_max": float, "prediction_error_mean": float, "error_estimate": float,
           "error_absolute": float, "error_reliable": bool, "error_basis": str}


def _logged_diagnostics(cache: Cache, plan: Plan) -> dict:
    """The diagnostics a committed replay of ``plan`` logged in its cache's change log (written with the
    cache), with the curvature and period it used: the one source of a run's diagnostics, fresh or
    resumed after a kill. Only the entry of this run counts, and only values of the expected types (a
    non-negative finite number for the estimates, None where the replay logged none); anything else
    is left out, which leaves the drift unknown."""
    entry = cache.manifest.changes[-1] if cache.manifest.changes else {}
    if entry.get("erasure_run") != plan.run_id:
        return {}
    out: dict = {}
    for key, kind in _LOGGED.items():
        v = entry.get(key)
        if kind is float:
            if v is None and key in entry:
                out[key] = None  # logged as not finite: the replay is not certified closer than its parent
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
                out[key] = float(v)
        elif isinstance(v, kind) and (kind is not int or not isinstance(v, bool)):
            out[key] = v
    config = entry.get("config")
    if isinstance(config, dict):
        try:
            used = DeltaGradConfig.from_dict(config).resolve(full_batch=cache.plan.full_batch, kind=cache.spec.kind)
            out.update(curvature=used.curvature, period=used.period)
        except (InputError, ValueError, TypeError):
            pass
    return out


def _exact(m: _Model, plan: Plan, parent: Cache) -> Location:
    """The run's exact retraining as a cache (committed by an earlier attempt, or computed now)."""
    from .. import api
    done = m.runs.committed(plan.run_id, "exact")
    if done is not None:
        return done
    target = m.runs.new_attempt(plan.run_id, "exact")
    api.retrain_exact(parent, delete=list(plan.delete_ids), out_cache=target, data=plan.data,
                      note={"erasure_run": plan.run_id})
    return target


def _key(m: _Model, loc: Location) -> str:
    key = loc.relative_to(m.reg.root)
    if key is None:
        raise AssertionError(f"{loc.uri} is not below {m.reg.root.uri}")
    return key


def _verify(m: _Model, plan: Plan, parent: Cache, new: Cache, verify: VerifySettings) -> dict:
    """Sampled verification (``verify.sample`` of the runs, drawn from the run id): the new model
    against exact retraining; above ``verify.tolerance`` the exact retraining is published instead."""
    from .. import api
    out = {"published_key": _key(m, new.root), "published_sha256": new.manifest.model_sha256(),
           "method": "deltagrad"}
    if random.Random(plan.run_id).random() >= verify.sample:
        return {**out, "verification": {"performed": False, "sample": verify.sample}}
    t = time.perf_counter()
    exact = api.retrain_exact(parent, delete=list(plan.delete_ids), data=plan.data)
    exact_s = time.perf_counter() - t
    moved = float((exact - parent.final).norm())
    dist = float((new.final - exact).norm())
    ratio = dist / moved if moved > 0 else (0.0 if dist == 0 else math.inf)
    passed = ratio <= verify.tolerance
    out["verification"] = {"performed": True, "dist_deltagrad_exact": dist, "dist_exact_parent": moved,
                           "ratio": ratio, "tolerance": verify.tolerance, "passed": passed, "exact_s": exact_s}
    if not passed:
        exact_cache = open_cache(_exact(m, plan, parent))
        out.update(published_key=_key(m, exact_cache.root), published_sha256=exact_cache.manifest.model_sha256(),
                   method="exact-retrain")
    return out


def _read_result(loc: Location, raw: bytes) -> dict:
    advice = "delete it and rerun: the run computes it again"
    obj = decode(raw, loc.uri, "run result", advice)
    f = Fields(obj, loc.uri, "run result", advice)
    nv = f.int("new_version", minimum=1, optional=True)
    if nv is not None:
        f.key("published_key")
        f.str("published_sha256")
        if f.str("method") not in ("deltagrad", "exact-retrain"):
            raise Damaged(f"{loc.uri}: damaged run result (method); {advice}")
    return obj


def _certificate(m: _Model, plan: Plan, parent: Cache, new: Cache, diag: dict) -> dict:
    """The new version's error statement (docs/certificate.md): the replay's own estimate of
    ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_parent‖, and the chain's drift since the last exact version —
    the sum of each replay's absolute estimate, relative to ‖θ_new − θ_last exact‖."""
    own_abs = diag.get("error_absolute")
    cert = {"error_estimate": diag.get("error_estimate"), "error_absolute": own_abs,
            "reliable": bool(diag.get("error_reliable", False)), "basis": diag.get("error_basis", "unknown")}
    latest = m.reg.version_record(plan.parent.version, m.reg.latest())
    base, replays = _since_exact(m, latest) if latest is not None else (None, 0)
    prev = (latest.certificate or {}) if latest is not None and latest.method == "deltagrad" else {}
    prev_abs = prev.get("drift_absolute", 0.0 if latest is None or latest.method != "deltagrad" else None)
    cert.update(since_exact_version=None if base is None else base.version, replays_since_exact=replays + 1,
                drift_absolute=None, drift_estimate=None)
    if own_abs is None or prev_abs is None or base is None:
        return cert  # an estimate is missing along the chain: the drift is unknown
    drift = float(own_abs) + float(prev_abs)
    cert["drift_absolute"] = drift
    try:
        moved = float((new.final - m.reg.open(base).final).double().norm())
    except StorageError:
        return cert  # the last exact version's cache was pruned: the ratio is unknown
    # None with drift_unbounded: the estimate reaches the whole effect (nothing is certified)
    cert["drift_estimate"] = drift / (moved - drift) if moved > drift else None
    cert["drift_unbounded"] = moved <= drift
    cert["reliable"] = cert["reliable"] and bool(prev.get("reliable", True))
    return cert


def _result(m: _Model, plan: Plan, lease: Lease | None, verify: VerifySettings,
            reconcile: ReconcileSettings | None = None) -> dict:
    """The run's result.json: read, or computed (replay → check) and written once."""
    loc = m.runs.run_file(plan.run_id, "result.json")
    cur = loc.read_versioned()
    if cur is not None:
        return _read_result(loc, cur[0])
    if not plan.delete_ids:
        result: dict = {"new_version": None, "note": "no request to apply: nothing to erase"}
    else:
        parent = _parent(m, plan)
        t = time.perf_counter()
        if plan.method == "exact-retrain":
            new = open_cache(_exact(m, plan, parent))
            diag: dict = {"method": "exact-retrain"}
        else:
            target, resumed = _replay(m, plan, parent)
            new = open_cache(target)
            diag = {**_logged_diagnostics(new, plan), **({"resumed": True} if resumed else {})}
        result = {"new_version": plan.version, "deltagrad_key": _key(m, new.root),
                  "deltagrad_sha256": new.manifest.model_sha256(), "diagnostics": diag,
                  "deltagrad_s": time.perf_counter() - t}
        check(lease)
        if plan.method == "exact-retrain":
            result.update(published_key=_key(m, new.root), published_sha256=new.manifest.model_sha256(),
                          method="exact-retrain", verification={"performed": False, "exact": True},
                          certificate=_exact_certificate(plan, "every_versions"))
        else:
            cert = _certificate(m, plan, parent, new, diag)
            result.update(_verify(m, plan, parent, new, verify))
            if result["verification"].get("performed"):
                v = result["verification"]
                cert["verification"] = {"performed": True, "ratio": v["ratio"], "passed": v["passed"]}
            drift = cert.get("drift_estimate")
            if result["method"] == "exact-retrain":  # verification failed: the exact model is published
                cert = {**_exact_certificate(plan, "verification failed"), "verification": cert.get("verification"),
                        "replay_estimate": cert.get("error_estimate")}
            elif (reconcile is not None and reconcile.max_drift is not None and cert["reliable"]
                  and (cert.get("drift_unbounded") or (drift is not None and drift > reconcile.max_drift))):
                exact_cache = open_cache(_exact(m, plan, parent))  # reconciliation by drift
                result.update(published_key=_key(m, exact_cache.root),
                              published_sha256=exact_cache.manifest.model_sha256(), method="exact-retrain")
                why = "drift unbounded" if drift is None else f"drift {drift:.3g} > max_drift {reconcile.max_drift:g}"
                cert = {**_exact_certificate(plan, why),
                        "replay_estimate": cert.get("error_estimate"), "replay_drift": drift}
            result["certificate"] = cert
    if not create(loc, result):  # a twin run of the same plan wrote it first: use theirs
        result = _read_result(loc, loc.read_bytes())
    return result


def _exact_certificate(plan: Plan, why: str) -> dict:
    """An exact retraining's statement: no error, the drift restarts at 0."""
    return {"error_estimate": 0.0, "error_absolute": 0.0, "reliable": True, "basis": "exact",
            "drift_estimate": 0.0, "drift_absolute": 0.0, "since_exact_version": plan.version,
            "replays_since_exact": 0, "reconciled": why}


def _erased_before(m: _Model, latest: VersionRecord) -> set[int]:
    """Every id an earlier published version of the output erased (from their plans)."""
    out: set[int] = set()
    for rec in m.reg.lineage():
        if rec.method in ("deltagrad", "exact-retrain") and m.runs.plan_file(rec.run_id).exists():
            out.update(m.runs.plan(rec.run_id).delete_ids)
    return out


def _published_cache(m: _Model, plan: Plan, result: dict) -> Cache:
    cache = open_cache(m.reg.root.join(result["published_key"]))
    if cache.manifest.model_sha256() != result["published_sha256"]:
        raise Damaged(f"{cache.uri}: the cache's model is not the one the run's result recorded; delete "
                      f"{m.runs.run_file(plan.run_id, 'result.json').uri} and run again")
    return cache


def execute(m: _Model, plan: Plan, lease: Lease | None, verify: VerifySettings,
            reconcile: ReconcileSettings | None = None) -> dict | None:
    """Carry a plan through; each step is skipped when its marker says it was done.

    Steps: replay into a fresh attempt directory (marker: a committed manifest) → check →
    ``result.json`` → publish by compare-and-swap on LATEST.json → ``versions/NNNN.json`` → the
    audit record → the ledger entry. Returns the audit record, or None if the run lost the race to
    publish (its plan is closed as superseded, its requests pend again).
    """
    t0 = time.perf_counter()
    latest, _ = m.reg.read_latest()
    rec = m.reg.version_record(plan.version, latest)
    published = rec is not None and rec.run_id == plan.run_id
    result = _result(m, plan, lease, verify, reconcile)
    check(lease)
    if result["new_version"] is not None and not published:
        if m.runs.is_closed(plan.run_id):
            return None  # abandoned while it worked
        new = _published_cache(m, plan, result)
        parent_rec = m.reg.version_record(plan.parent.version, latest)
        if parent_rec is None or parent_rec.model_sha256 != plan.parent.model_sha256:
            return _superseded(m, plan, latest)
        removed = new.removed_mask()
        ids, _ = new.row_ids(plan.data)
        back = _erased_before(m, latest) - (set(ids[removed.numpy()].tolist()) if removed is not None else set())
        if back:  # never publish a model that holds a row an earlier version erased
            raise Damaged(f"{new.uri}: the new model would hold {len(back)} id(s) that an earlier version erased "
                          f"(e.g. {sorted(back)[:3]}); not published — the plan's parent is not the latest "
                          f"lineage: abandon run {plan.run_id} and run again")
        rec = m.reg.new_record(new, version=plan.version, run_id=plan.run_id, method=result["method"],
                               parent=parent_rec, applied=plan.counts()["applied"], erased=len(plan.delete_ids),
                               certificate=result.get("certificate"))
        try:
            m.reg.publish(rec, plan.parent.etag)
        except Conflict:
            latest, _ = m.reg.read_latest()
            got = m.reg.version_record(plan.version, latest)
            if got is None or got.run_id != plan.run_id:
                return _superseded(m, plan, latest)
            rec = got  # a twin run of this plan published it
    if rec is not None and result["new_version"] is not None:
        m.reg.record_version(rec)
    audit = _audit(m, plan, result, rec if result["new_version"] is not None else None, time.perf_counter() - t0,
                   lease)
    loc = m.runs.audit_file(plan)
    if not create(loc, audit):
        audit = decode(loc.read_bytes(), loc.uri, "audit record", "restore it from a backup")
    m.ledger.write(plan, plan.version if result["new_version"] is not None else None)
    return audit


def _superseded(m: _Model, plan: Plan, latest: VersionRecord | None) -> None:
    moved = f"version {latest.version} (run {latest.run_id})" if latest else "another version"
    if m.runs.close(plan, "superseded", f"LATEST moved to {moved} before this run published; its requests were "
                                        "planned again on top of it"):
        _closed_audit(m, plan, "superseded")
    return None


def _audit(m: _Model, plan: Plan, result: dict, rec: VersionRecord | None, seconds: float,
           lease: Lease | None) -> dict:
    counts = plan.counts()
    return {"run_id": plan.run_id, "model": plan.model, "created": plan.created, "finished": now(),
            "outcome": "published" if rec else "settled",
            "parent": {"version": plan.parent.version, "run_id": plan.parent.run_id, "uri": plan.parent.uri,
                       "model_sha256": plan.parent.model_sha256},
            "new": None if rec is None else {"version": rec.version, "cache": rec.cache, "key": rec.key,
                                             "model_sha256": rec.model_sha256, "method": rec.method},
            "requests": {"received": len(plan.requests), **counts},
            "settled": [{"request_id": r.request_id, "data_id": r.data_id, "source": r.source, "status": r.status,
                         "reason": r.reason} for r in plan.requests],
            "deleted_ids": len(plan.delete_ids), "verification": result.get("verification"),
            "certificate": result.get("certificate"), "diagnostics": result.get("diagnostics"),
            "lease_holder": lease.holder if lease else None,
            "timings": {"deltagrad_s": result.get("deltagrad_s"),
                        "exact_s": (result.get("verification") or {}).get("exact_s"), "run_s": seconds}}


def _closed_audit(m: _Model, plan: Plan, outcome: str, detail: dict | None = None) -> dict:
    """The audit record of a run that will not publish: its requests pend again."""
    audit = {"run_id": plan.run_id, "model": plan.model, "created": plan.created, "finished": now(),
             "outcome": outcome,
             "parent": {"version": plan.parent.version, "run_id": plan.parent.run_id, "uri": plan.parent.uri,
                        "model_sha256": plan.parent.model_sha256}, "new": None,
             "requests": {"received": len(plan.requests), "returned_to_pending": len(plan.requests)},
             "settled": [], "deleted_ids": 0, "verification": None, "certificate": None, "diagnostics": None,
             **(detail or {}), "timings": {"deltagrad_s": None, "exact_s": None, "run_s": 0.0}}
    create(m.runs.audit_file(plan, f"-{outcome}"), audit)
    return audit


# -- one model, end to end -----------------------------------------------------------------------------------

def erase_model(target: Target, inbox: str | Location, settings: Settings = Settings(),
                snapshot: Inbox | None = None) -> list[dict]:
    """Take the model's lease, finish any open run, then apply its pending requests (planning again
    while more arrive, up to ``settings.max_runs`` runs). Returns the audit record of each run done.

    Args:
      target: the model.
      inbox: the requests prefix.
      settings: verification, lease, runs, retention.
      snapshot: the inbox as already read (the first plan uses it; later ones read it again).

    Raises:
      LeaseBusy: another run holds the lease (and did not release it within ``lease.wait_s``).
      LeaseLost: the lease expired or was taken over mid-run (stopped between two steps).
    """
    inbox_uri = location(inbox).portable_uri
    m = _Model(target, inbox_uri)
    held = Lease(m.reg.root, settings.lease).acquire() if settings.lease is not None else None
    try:
        audits: list[dict] = []
        for i in range(settings.max_runs):
            check(held)
            box = snapshot if (i == 0 and snapshot is not None) else read_inbox(inbox_uri)
            plan = _next_plan(m, box, settings)
            if plan is None:
                break
            audit = execute(m, plan, held, settings.verify, settings.reconcile)
            if audit is not None:
                audits.append(audit)
        if settings.retention is not None:
            from .retention import prune
            prune(target.output, settings.retention, lease=held)
        return audits
    finally:
        if held is not None:
            held.release()


def bulk_erasure(*, cache: str | Location | None = None, requests: str | Location, output: str | Location,
                 config: DeltaGradConfig = DeltaGradConfig(), verify: dict | VerifySettings | None = None,
                 data: str | Location | None = None, ledger: str | Location | None = None,
                 lease: LeaseSettings | None = LeaseSettings(), max_runs: int = 20, name: str | None = None
                 ) -> list[dict]:
    """One model's bulk erasure (a fleet of one; see :func:`~.fleet.erase_fleet` for many).

    Args:
      cache: the first version's cache (used until ``output`` has published one).
      requests: the inbox (request files).
      output: the model's prefix: versions, plans, markers, ledger, lease and audit records.
      config: DeltaGrad settings.
      verify: ``{sample, tolerance}`` (:class:`~.plan.VerifySettings`): the fraction of runs checked
        against exact retraining, and the error (relative to the erasure's effect) above which the
        exact model is published.
      data: the training data, if not at the location recorded in the cache.
      ledger: a ledger prefix of an older version to honour (read only; new entries go to ``output/ledger``).
      lease: how to take the lease (None: do not take it — correctness still holds, by
        compare-and-swap, but concurrent runs would duplicate work).
      max_runs: the most runs (plans) carried through in one call.
      name: the model's name in reports (default: the output's last path part).

    Returns:
      The audit record of each run done.
    """
    out = location(output)
    target = Target(name or out.name or "model", out.portable_uri,
                    None if cache is None else location(cache).portable_uri,
                    None if data is None else location(data).portable_uri,
                    None if ledger is None else location(ledger).portable_uri, config)
    v = verify if isinstance(verify, VerifySettings) else VerifySettings.from_dict(verify)
    return erase_model(target, requests, Settings(v, lease, max_runs))


def result_line(audits: list[dict]) -> dict:
    """Counts over some runs' audit records (the job's summary)."""
    published = [a for a in audits if a.get("new")]
    return {"runs": [a["run_id"] for a in audits],
            "applied": sum(a["requests"].get("applied", 0) for a in audits),
            "published": published[-1]["new"] if published else None}


__all__ = ["Settings", "Target", "bulk_erasure", "erase_model", "execute", "plan_erasure", "result_line"]
