"""What the erasure tests read back: the published model, what each model settled."""

from __future__ import annotations

from deltagrad_ray.erasure import Ledger, Registry, Runs, settlements
from deltagrad_ray.store import open_cache


def latest_cache(output):
    """The published version's cache (its model checked against the record)."""
    reg = Registry(output)
    return reg.open(reg.latest())


def settled(output, requests=None) -> dict:
    """(request_id, data_id) → Settlement, as the model's ledger and lineage agree."""
    reg = Registry(output)
    legacy = [] if requests is None else [str(requests) + "/_done"]
    return settlements(Ledger(output, legacy), Runs(output), reg, reg.latest()).by_key


def applied_once(output) -> dict[str, str]:
    """request_id → the run that applied it, checking that no request is applied by two runs."""
    seen: dict[str, str] = {}
    runs = Runs(output)
    for run_id in sorted(Ledger(output).entries()):
        for r in runs.plan(run_id).requests:
            if r.status == "applied":
                assert r.request_id not in seen, f"{r.request_id} applied twice"
                seen[r.request_id] = run_id
    return seen


__all__ = ["applied_once", "latest_cache", "open_cache", "settled"]
