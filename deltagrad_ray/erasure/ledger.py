"""The ledger: which runs of a model have settled their requests, and what the model has settled.

Each model keeps its own ledger beside its outputs, ``output/ledger/<run>.json`` (create-only,
written after the run's version is published), where whoever drops request files cannot write
(see infra/README.md). An entry is a marker, not the truth: a run counts as settled only if

* the output holds the run's plan (``plans/<run>.json``), and
* the plan erased nothing, or the output's lineage holds the version the plan made, published by
  that run.

What was settled, and how, is then read from the plan. So an entry forged in a ledger (a run that
is not this model's, or a plan that never published) settles nothing and is reported, and two
models fed from one inbox never settle each other's requests.

Ledgers of older versions keep working: entries under ``requests/_done/`` (and a ``ledger:``
prefix of the config) are read with the same rule — entries of this model's runs count, the
others are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..store.location import Location, location
from ..store.records import create
from ..store.registry import Registry, VersionRecord, now
from .plan import RUN_ID, Plan, Runs, Settled

LEDGER = "ledger"


@dataclass(frozen=True)
class Settlement:
    """What a model settled for one request (identity: request_id, data_id).

    Fields:
      request_id, data_id: the request
      status, reason:      its fate (the first applying run's, if any applied it)
      run_id, version:     the run that settled it and the version it published (None: none)
      rows:                every inbox row (place and content) settled as this request
    """

    request_id: str | None
    data_id: int | None
    status: str
    reason: str | None
    run_id: str
    version: int | None
    rows: frozenset


@dataclass(frozen=True)
class Settlements:
    """A model's settled requests.

    Fields:
      by_key:   (request_id, data_id) → :class:`Settlement` (malformed rows are not here)
      rows:     every settled inbox row (place and content)
      runs:     the settled runs (believed)
      ignored:  ledger entries not believed: (run id, where, why)
    """

    by_key: dict
    rows: frozenset
    runs: frozenset
    ignored: tuple[tuple[str, str, str], ...]


class Ledger:
    """A model's ledger (``output/ledger/``) and the older ledgers it still honours.

    Args:
      output: the model's output prefix.
      legacy: ledger prefixes of older versions to read too (``requests/_done``, a config's ``ledger:``).
    """

    def __init__(self, output: str | Location, legacy: Sequence[str | Location | None] = ()) -> None:
        self.root = location(output).join(LEDGER)
        self.legacy = tuple(location(x) for x in legacy if x is not None)

    def entry(self, run_id: str) -> Location:
        return self.root.join(f"{run_id}.json")

    def entries(self) -> dict[str, list[Location]]:
        """run id → the entries naming it, in this ledger and the legacy ones (names only: nothing read)."""
        out: dict[str, list[Location]] = {}
        for root in (self.root, *self.legacy):
            for f in root.list():
                if f.name.endswith(".json") and not f.name.startswith("."):
                    out.setdefault(f.name[:-5], []).append(f)
        return out

    def write(self, plan: Plan, version: int | None) -> None:
        create(self.entry(plan.run_id), {
            "run_id": plan.run_id, "model": plan.model, "settled": now(), "version": version,
            "requests": [{"request_id": r.request_id, "data_id": r.data_id, "status": r.status, "reason": r.reason,
                          "source": r.source} for r in plan.requests]})


def believed(plan: Plan, latest: VersionRecord | None, reg: Registry) -> str | None:
    """Why a ledger entry for ``plan`` is not believed (None: it is): the plan erased something, and
    the lineage holds no version that this run published."""
    if not plan.delete_ids:
        return None
    rec = reg.version_record(plan.version, latest)
    if rec is None or rec.run_id != plan.run_id:
        return f"its plan's version {plan.version} was not published by this run"
    return None


def settlements(ledger: Ledger, runs: Runs, reg: Registry, latest: VersionRecord | None,
                plans: Iterable[Plan] | None = None) -> Settlements:
    """What the model has settled, from the ledger entries that agree with its plans and lineage.

    Args:
      ledger, runs, reg: the model's ledger, plans and registry.
      latest: its published version (as read for this decision).
      plans: the plans already read (optional, to read fewer).
    """
    known = {p.run_id: p for p in (plans or [])}
    plan_ids = set(runs.plan_ids())
    by_key: dict = {}
    rows: set = set()
    good: set[str] = set()
    ignored: list[tuple[str, str, str]] = []
    for run_id, where in sorted(ledger.entries().items()):
        if not RUN_ID.fullmatch(run_id) or run_id not in plan_ids:
            ignored.append((run_id, where[0].uri, "no plan of this model's output has this run id"))
            continue
        plan = known.get(run_id) or runs.plan(run_id)
        why = believed(plan, latest, reg)
        if why is not None:
            ignored.append((run_id, where[0].uri, why))
            continue
        good.add(run_id)
        version = plan.version if plan.delete_ids else None
        for r in plan.requests:
            rows.add(r.row)
            if r.request_id is None or r.data_id is None:
                continue
            prev = by_key.get(r.key)
            if prev is None or (prev.status != "applied" and r.status == "applied"):
                by_key[r.key] = Settlement(r.request_id, r.data_id, r.status, r.reason, run_id,
                                           version if r.status == "applied" else None,
                                           frozenset({r.row}) | (prev.rows if prev else frozenset()))
            else:
                by_key[r.key] = Settlement(prev.request_id, prev.data_id, prev.status, prev.reason, prev.run_id,
                                           prev.version, prev.rows | {r.row})
    return Settlements(by_key, frozenset(rows), frozenset(good), tuple(ignored))


def pending_rows(requests: Iterable, settled: Settlements, in_open: Iterable[Settled] = ()) -> list:
    """The inbox rows not yet settled for the model (nor planned by an open plan of it)."""
    taken = set(settled.rows) | {r.row for r in in_open}
    return [r for r in requests if r.row not in taken]
