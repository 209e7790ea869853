"""Retention: superseded versions hold the erased rows' gradients — delete them on a schedule.

A version is *superseded* once a later version is published; its cache (trajectory shards, model)
still carries every row it was trained with, including those the later versions erased. With
``retention: {superseded_days: D}`` each such cache is deleted once D days have passed since the
first later version that erased something was published (D = 0: at the next run). The latest
version is never deleted. Every deletion is recorded (``output/pruned/NNNN.json`` and an audit
record), and ``erasure trace`` says where an id still survives and until when. A cache outside the
output prefix (a first version trained elsewhere) is not deleted here: it is reported, with its
location, for its owner to delete.

Closed runs (superseded or abandoned before publishing) leave caches under ``runs/<run>/``; they are
deleted on the same schedule, counted from when the run was closed.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass

from ..core.errors import InputError
from ..store.location import Location, StorageError, location
from ..store.records import create, read
from ..store.registry import Registry, VersionRecord, now
from .lease import Lease, LeaseBusy, LeaseSettings, check
from .plan import Runs


@dataclass(frozen=True)
class RetentionSettings:
    """How long superseded versions are kept (checked when built).

    Fields:
      superseded_days: days a superseded version's cache is kept after a later version erased rows
        from the model (0: deleted at the next run)
    """

    superseded_days: float = 30.0

    def __post_init__(self) -> None:
        v = self.superseded_days
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise InputError(f"retention.superseded_days must be a finite number >= 0, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> RetentionSettings | None:
        if d is None or d.get("superseded_days", 0) is None:
            return None  # `superseded_days: null`: superseded versions are kept
        unknown = sorted(set(d) - {"superseded_days"})
        if unknown:
            raise InputError(f"unknown retention setting {unknown[0]!r}; expected superseded_days")
        return cls(**d)


def _time(iso: str) -> _dt.datetime | None:
    try:
        t = _dt.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def pruned_file(root: Location, version: int) -> Location:
    return root.join("pruned", f"{version:04d}.json")


def pruned(root: Location, version: int) -> dict | None:
    """The prune record of ``version`` (None: its cache was not deleted)."""
    return read(pruned_file(root, version), "prune record", "remove the file and run `erasure prune` again")


def superseded_deadlines(reg: Registry, settings: RetentionSettings | None) -> dict[int, dict]:
    """For each superseded version: since when it holds erased rows (the first later version that
    erased some was published then) and until when retention keeps it (None: no retention set)."""
    lineage = list(reversed(reg.lineage()))  # oldest first
    out: dict[int, dict] = {}
    for i, rec in enumerate(lineage[:-1]):
        later = next((r for r in lineage[i + 1:] if r.erased > 0 or r.method in ("deltagrad", "exact-retrain")),
                     None)
        if later is None:
            continue
        since = _time(later.published)
        until = None if settings is None or since is None else since + _dt.timedelta(days=settings.superseded_days)
        out[rec.version] = {"record": rec, "since": later.published, "erased_by": later.version,
                            "until": None if until is None else until.isoformat(timespec="seconds")}
    return out


def _delete_tree(loc: Location) -> int:
    n = 0
    for f in loc.list(recursive=True):
        f.delete()
        n += 1
    return n


def prune(output: str | Location, settings: RetentionSettings, *, at: _dt.datetime | None = None,
          lease: Lease | None = None, dry_run: bool = False) -> dict:
    """Delete what retention no longer keeps: superseded versions' caches and closed runs' caches.

    Args:
      output: the model's output prefix.
      settings: the retention policy.
      at: the time to judge by (default: now).
      lease: the lease held (checked between deletions).
      dry_run: report, delete nothing.

    Returns:
      ``{"deleted": [...], "kept": [...], "outside": [...]}``: versions (and runs) deleted, kept with
      until when, and caches outside the prefix left to their owner.
    """
    reg, runs = Registry(output), Runs(output)
    t = at or _dt.datetime.now(_dt.timezone.utc)
    out: dict = {"deleted": [], "kept": [], "outside": []}
    for version, d in sorted(superseded_deadlines(reg, settings).items()):
        rec: VersionRecord = d["record"]
        if pruned(reg.root, version) is not None:
            continue
        until = _time(d["until"])
        if until is not None and t < until:
            out["kept"].append({"version": version, "until": d["until"]})
            continue
        if rec.key is None:
            out["outside"].append({"version": version, "cache": rec.cache})
            continue
        check(lease)
        files = 0 if dry_run else _delete_tree(reg.root.join(rec.key))
        entry = {"version": version, "cache": rec.cache, "key": rec.key, "files": files, "pruned": now(),
                 "erased_by": d["erased_by"], "retention_days": settings.superseded_days}
        if not dry_run:
            create(pruned_file(reg.root, version), entry)
        out["deleted"].append(entry)
    for run_id, info in sorted(runs.closed().items()):
        closed_at = _time(info["closed"])
        if closed_at is None or t < closed_at + _dt.timedelta(days=settings.superseded_days):
            continue
        folder = runs.root.join("runs", run_id)
        if not folder.list(recursive=True):
            continue
        check(lease)
        files = 0 if dry_run else _delete_tree(folder)
        out["deleted"].append({"run_id": run_id, "files": files, "reason": info["reason"]})
    if out["deleted"] and not dry_run:
        stamp = t.strftime("%Y%m%dT%H%M%SZ")
        create(reg.root.join("audit", f"{stamp}-prune.json"), {"outcome": "pruned", "finished": now(), **out,
                                                                "retention_days": settings.superseded_days})
    return out


def prune_outputs(outputs: list[str], settings: RetentionSettings, dry_run: bool = False,
                  lease: LeaseSettings = LeaseSettings()) -> dict[str, dict]:
    """:func:`prune` of several outputs under their leases (``erasure prune``); one failing (its lease
    held by a run, say) does not stop the others."""
    result = {}
    for o in outputs:
        try:
            with Lease(o, lease) as held:
                result[location(o).uri] = prune(o, settings, dry_run=dry_run, lease=held)
        except (StorageError, LeaseBusy) as e:
            result[location(o).uri] = {"error": str(e)}
    return result
