"""What a run will do, decided and written before it does anything; and the markers of its steps.

Under a model's output prefix (beside the registry's ``LATEST.json`` and ``versions/``)::

    plans/<run>.json            the plan: parent version, ids to erase, every request's fate
    runs/<run>/cache-<a>/       the run's replayed cache (a fresh attempt directory per try)
    runs/<run>/exact-<a>/       its exact retraining (verification failed, or reconciliation)
    runs/<run>/result.json      what the run computed (its marker: the new cache is committed)
    closed/<run>.json           a run that will never publish (superseded or abandoned)
    audit/<time>-<run>.json     the audit record of each run
    failures/<time>-<run>.json  a run that failed (what `erasure status` shows as the last failure)

Every file here is created once and never rewritten. Every one read back is checked
(:mod:`deltagrad_ray.store.records`): a damaged file is a storage error naming it.

A request's fate in a plan (``status``):

* ``applied``: the model holds the id and has not erased it: this run erases it;
* ``not present``: the model's training data does not hold the id (settled for this model);
* ``already erased``: an earlier version of this model erased it (settled, nothing to do);
* ``duplicate``: the same (request_id, data_id) appears again: in this batch, or settled before;
* ``rejected``: the row is malformed (the reason says how).
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import uuid
from dataclasses import asdict, dataclass, field

from ..core.errors import InputError
from ..store.cache_format import MANIFEST
from ..store.location import Location, location
from ..store.records import Damaged, Fields, create, decode, dump
from ..store.registry import now
from .requests import row_identity

STATUSES = ("applied", "not present", "already erased", "duplicate", "rejected")
RUN_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}")


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _number(name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> float:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        rng = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high != math.inf else "")
        raise InputError(f"{name} must be a finite number {rng}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class VerifySettings:
    """Sampled verification against exact retraining (checked when built, before any replay).

    Fields:
      sample:    the fraction of runs checked against exact retraining (0: none; the certificate
                 still states every run's error, see :mod:`.run`)
      tolerance: the error ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_parent‖ above which the exact retraining is
                 published instead (0: any difference at all publishes the retraining)
    """

    sample: float = 0.0
    tolerance: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample", _number("verify.sample", self.sample, 0.0, 1.0))
        object.__setattr__(self, "tolerance", _number("verify.tolerance", self.tolerance, 0.0))

    @classmethod
    def from_dict(cls, d: dict | None) -> VerifySettings:
        d = dict(d or {})
        unknown = sorted(set(d) - {"sample", "tolerance"})
        if unknown:
            raise InputError(f"unknown verify setting {unknown[0]!r}; expected sample, tolerance")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReconcileSettings:
    """When a run publishes an exact retraining instead of a replay (checked when built).

    Each DeltaGrad version replays the previous version's replayed path, so errors add up along a
    chain; an exact retraining (from the first version's data minus every erased id) sets the drift
    back to 0. A run reconciles when

    * ``every_versions``: the chain since the last exact version would reach this many replays
      (None: never by count) — the policy for models whose estimate is not reliable (an MLP);
    * ``max_drift``: the replay's certified drift (``drift_estimate``: the chain's estimated error
      relative to what the erasures since the last exact version moved the model) exceeds it (None:
      never by drift). Only a reliable estimate (a convex model) decides; see docs/certificate.md.

    Defaults: ``max_drift`` 0.05 (the verify tolerance), ``every_versions`` 10.
    """

    max_drift: float | None = 0.05
    every_versions: int | None = 10

    def __post_init__(self) -> None:
        if self.max_drift is not None:
            object.__setattr__(self, "max_drift", _number("reconcile.max_drift", self.max_drift, 0.0, low_open=True))
        v = self.every_versions
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"reconcile.every_versions must be an integer >= 1 or null, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> ReconcileSettings:
        d = dict(d or {})
        unknown = sorted(set(d) - {"max_drift", "every_versions"})
        if unknown:
            raise InputError(f"unknown reconcile setting {unknown[0]!r}; expected max_drift, every_versions")
        return cls(**d)


@dataclass(frozen=True)
class Settled:
    """One request's fate in a plan.

    Fields:
      request_id, data_id, timestamp, source: as read (:class:`~.requests.Request`)
      status:  one of :data:`STATUSES`
      reason:  why (for every status but ``applied``)
    """

    request_id: str | None
    data_id: int | None
    timestamp: str | None
    source: str
    status: str
    reason: str | None = None

    @property
    def key(self) -> tuple[str | None, int | None]:
        return self.request_id, self.data_id

    @property
    def row(self) -> tuple:
        """The inbox row it settles (:attr:`~.requests.Request.row`)."""
        return row_identity(self.source, self.request_id, self.data_id,
                            self.reason if self.status == "rejected" else None)


@dataclass(frozen=True)
class PlanParent:
    """The version a run builds on (``etag``: LATEST.json's when the run planned; None: none published)."""

    version: int
    run_id: str | None
    uri: str
    key: str | None
    model_sha256: str
    cache_run_id: str | None
    etag: str | None


@dataclass(frozen=True)
class Plan:
    """What one run does, written before it does it (``plans/<run>.json``).

    Fields:
      run_id, created: the run
      model:      the fleet model's name
      version:    the version it will publish (parent + 1)
      parent:     :class:`PlanParent`
      delete_ids: the distinct ids it erases, sorted
      requests:   every pending request's fate (:class:`Settled`)
      deltagrad:  the DeltaGrad settings (``DeltaGradConfig.to_dict``)
      verify:     :class:`VerifySettings` as a dict
      data:       the training data's location, when not the one the cache records
      inbox:      where the requests were read
      method:     how the new version is computed: ``deltagrad``, or ``exact-retrain`` (reconciliation)
    """

    run_id: str
    created: str
    model: str
    version: int
    parent: PlanParent
    delete_ids: tuple[int, ...]
    requests: tuple[Settled, ...]
    deltagrad: dict = field(default_factory=dict)
    verify: dict = field(default_factory=dict)
    data: str | None = None
    inbox: str | None = None
    method: str = "deltagrad"

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "created": self.created, "model": self.model, "version": self.version,
                "parent": asdict(self.parent), "delete_ids": list(self.delete_ids),
                "requests": [asdict(r) for r in self.requests], "deltagrad": self.deltagrad, "verify": self.verify,
                "data": self.data, "inbox": self.inbox, "method": self.method}

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for r in self.requests:
            out[r.status] += 1
        return out

    @classmethod
    def parse(cls, obj: dict, uri: str) -> Plan:
        advice = ("a plan is written once by the run that made it: restore it from a backup, or close the run "
                  "with `deltagrad-ray erasure abandon RUN_ID` if it never published")
        f = Fields(obj, uri, "plan", advice)
        p = f.sub("parent")
        parent = PlanParent(p.int("version", minimum=0), p.str("run_id", optional=True), p.str("uri"),
                            p.key("key", optional=True), p.str("model_sha256"), p.str("cache_run_id", optional=True),
                            p.str("etag", optional=True))
        requests = []
        for i, r in enumerate(f.list("requests")):
            g = Fields(r, uri, "plan", advice, f"requests[{i}].")
            status = g.str("status")
            if status not in STATUSES:
                raise Damaged(f"{uri}: damaged plan (requests[{i}].status {status[:30]!r} is not one of "
                              f"{', '.join(STATUSES)}); {advice}")
            did = g.int("data_id", optional=True)
            requests.append(Settled(g.str("request_id", optional=True), did, g.str("timestamp", optional=True),
                                    g.str("source"), status, g.str("reason", optional=True)))
        sources = f.dict("sources", optional=True) or {}  # plans written before fleets
        verify = dict(f.dict("verify", optional=True) or {})
        data = f.str("data", optional=True) if "data" in obj else verify.get("data")
        verify.pop("data", None)
        method = f.str("method", optional=True) or "deltagrad"
        if method not in ("deltagrad", "exact-retrain"):
            raise Damaged(f"{uri}: damaged plan (method {method[:30]!r}); {advice}")
        return cls(f.str("run_id", pattern=RUN_ID), f.str("created"), f.str("model", optional=True) or "model",
                   f.int("version", minimum=1), parent, tuple(sorted(f.ints("delete_ids"))), tuple(requests),
                   f.dict("deltagrad", optional=True) or {}, verify, data,
                   f.str("inbox", optional=True) or sources.get("requests"), method)


class Runs:
    """Plans and the markers of their steps under a model's output prefix (see the module docstring)."""

    def __init__(self, output: str | Location) -> None:
        self.root = location(output)

    # -- plans
    def plan_file(self, run_id: str) -> Location:
        return self.root.join("plans", f"{run_id}.json")

    def plan_ids(self) -> list[str]:
        """Every run that wrote a plan, oldest first (run ids start with their UTC time)."""
        out = []
        for f in self.root.join("plans").list():
            if f.name.startswith("."):
                continue
            if not (f.name.endswith(".json") and RUN_ID.fullmatch(f.name[:-5])):
                raise Damaged(f"{f.uri}: not a plan (expected plans/<run id>.json); remove the file")
            out.append(f.name[:-5])
        return sorted(out)

    def plan(self, run_id: str) -> Plan:
        loc = self.plan_file(run_id)
        plan = Plan.parse(decode(loc.read_bytes(), loc.uri, "plan", "restore it from a backup"), loc.uri)
        if plan.run_id != run_id:
            raise Damaged(f"{loc.uri}: damaged plan (it names run {plan.run_id}); restore it from a backup")
        return plan

    def plans(self, skip: set[str] = frozenset()) -> list[Plan]:
        """The plans (oldest first), read except those of the runs in ``skip``."""
        return [self.plan(r) for r in self.plan_ids() if r not in skip]

    def write_plan(self, plan: Plan) -> None:
        self.plan_file(plan.run_id).create(dump(plan.to_dict()))

    # -- a run's files
    def run_file(self, run_id: str, name: str) -> Location:
        return self.root.join("runs", run_id, name)

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

    # -- closed runs
    def closed(self) -> dict[str, dict]:
        out = {}
        for f in self.root.join("closed").list():
            if not f.name.endswith(".json") or f.name.startswith("."):
                continue
            g = Fields(decode(f.read_bytes(), f.uri, "closed-run marker", "remove the file"), f.uri,
                       "closed-run marker", "remove the file")
            out[f.name[:-5]] = {"reason": g.str("reason"), "closed": g.str("closed"),
                                "detail": g.str("detail", optional=True)}
        return out

    def is_closed(self, run_id: str) -> bool:
        return self.root.join("closed", f"{run_id}.json").exists()

    def close(self, plan: Plan, reason: str, detail: str) -> bool:
        """Mark a run as never to publish (create-only); False if it was closed already."""
        return create(self.root.join("closed", f"{plan.run_id}.json"),
                      {"run_id": plan.run_id, "reason": reason, "detail": detail, "closed": now()})

    # -- records
    def audit_file(self, plan: Plan, suffix: str = "") -> Location:
        return self.root.join("audit", f"{plan.created.replace(':', '')}-{plan.run_id}{suffix}.json")

    def audits(self) -> list[Location]:
        return [f for f in self.root.join("audit").list() if f.name.endswith(".json")]

    def record_failure(self, model: str, kind: str, message: str, run_id: str | None = None) -> Location:
        """A failed run, for the operator (``erasure status``)."""
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        loc = self.root.join("failures", f"{stamp}-{uuid.uuid4().hex[:6]}.json")
        create(loc, {"model": model, "at": now(), "kind": kind, "message": message[:2000], "run_id": run_id})
        return loc

    def last_failure(self) -> dict | None:
        files = [f for f in self.root.join("failures").list() if f.name.endswith(".json")]
        if not files:
            return None
        f = files[-1]
        obj = decode(f.read_bytes(), f.uri, "failure record", "remove the file")
        return {k: obj.get(k) for k in ("model", "at", "kind", "message", "run_id")} | {"file": f.uri}
