"""Fleet erasure: one request inbox, every model that holds the data, each model's erasure an
independent task on Ray.

A request is settled *per model*: applied (the model published a version without the id), or
``not present`` (the model's data does not hold it), ``already erased``, ``duplicate``. Across the
fleet it is *erased* where some model applied it, and *rejected* only when malformed or when no
model of the fleet holds its id. Each model has its own lease, compare-and-swap publish, ledger and
resources (a GPU model on a GPU worker); one model failing (a damaged cache, a lost node, a lease
held) does not stop the others: its requests stay pending for it, and the result says which
models failed and why.

Exit codes of the job (README, "Bulk erasure"): 0 when every model settled what it had pending (a
model whose lease another run holds is skipped: that run does its work); with one model, its
failure's own code (2 bad input, 3 storage); with several, 4 when some failed ("partial").
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.errors import InputError
from ..runtime import EXIT_BUG, EXIT_INPUT, EXIT_OK, EXIT_PARTIAL, EXIT_STORAGE
from ..store.location import StorageError, location, overlap
from .lease import LeaseBusy
from .plan import Runs
from .requests import Inbox, read_inbox
from .run import Settings, Target, erase_model


@dataclass(frozen=True)
class Fleet:
    """Models fed from one inbox (checked when built: before anything is read or written).

    Fields:
      requests: the inbox
      models:   the models (:class:`~.run.Target`), names and outputs unique
      settings: what every model's run shares (:class:`~.run.Settings`)
    """

    requests: str
    models: tuple[Target, ...]
    settings: Settings = field(default_factory=Settings)

    def __post_init__(self) -> None:
        if not self.models:
            raise InputError("a fleet needs at least one model")
        names = [t.name for t in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InputError(f"model name {dup[0]!r} is used twice; every model of the fleet needs its own name")
        inbox = location(self.requests)
        outs = [(t.name, location(t.output)) for t in self.models]
        for i, (a, la) in enumerate(outs):
            if overlap(la, inbox) is not None:
                raise InputError(f"model {a}: output {la.uri} and the requests inbox {inbox.uri} overlap: whoever "
                                 "drops request files could then write the model's ledger and versions; keep them "
                                 "apart")
            for b, lb in outs[i + 1:]:
                if overlap(la, lb) is not None:
                    raise InputError(f"models {a} and {b} have overlapping outputs ({la.uri}, {lb.uri}); every "
                                     "model needs its own output prefix")


@dataclass(frozen=True)
class ModelOutcome:
    """What one model's task did.

    Fields:
      model:   its name
      status:  ``done`` | ``busy`` (another run holds its lease) | ``failed``
      audits:  the audit records of its runs
      kind:    for a failure: ``input``, ``storage``, ``cluster`` or ``bug``
      message: for a failure or busy: one line
      seconds: how long the task took
      lease:   for busy: the lease's holder and expiry
    """

    model: str
    status: str
    audits: tuple[dict, ...] = ()
    kind: str | None = None
    message: str | None = None
    seconds: float = 0.0
    lease: dict | None = None

    @property
    def code(self) -> int:
        return {"input": EXIT_INPUT, "storage": EXIT_STORAGE, "cluster": EXIT_STORAGE}.get(self.kind or "", EXIT_BUG) \
            if self.status == "failed" else EXIT_OK


def run_target(target: Target, inbox: str, settings: Settings, snapshot: Inbox | None = None) -> ModelOutcome:
    """One model's erasure as a task: never raises (but for an interrupt); a failure is an outcome
    with its kind and one-line message, also recorded under the model's ``failures/``."""
    t0 = time.perf_counter()
    try:
        audits = erase_model(target, inbox, settings, snapshot)
        return ModelOutcome(target.name, "done", tuple(audits), seconds=time.perf_counter() - t0)
    except LeaseBusy as e:
        return ModelOutcome(target.name, "busy", (), None, str(e), time.perf_counter() - t0,
                            {"holder": e.holder, "expires": e.expires})
    except (InputError, StorageError) as e:
        kind, message = ("input" if isinstance(e, InputError) else "storage"), str(e)
    except Exception as e:  # a bug: keep the traceback's last lines in the record
        kind = "bug"
        message = f"unexpected {type(e).__name__}: {e} | " + " | ".join(
            traceback.format_exc().strip().splitlines()[-6:])
    try:
        Runs(target.output).record_failure(target.name, kind, message)
    except (StorageError, InputError):
        pass  # the output itself may be what failed
    return ModelOutcome(target.name, "failed", (), kind, message.splitlines()[0] if message else kind,
                        time.perf_counter() - t0)


@dataclass(frozen=True)
class FleetResult:
    """The outcome of a fleet erasure.

    Fields:
      outcomes: one per model, in the fleet's order
      inbox:    the inbox as read at the start
    """

    outcomes: tuple[ModelOutcome, ...]
    inbox: Inbox

    @property
    def failed(self) -> dict[str, str]:
        return {o.model: o.message or o.kind or "failed" for o in self.outcomes if o.status == "failed"}

    @property
    def busy(self) -> dict[str, str]:
        return {o.model: o.message or "" for o in self.outcomes if o.status == "busy"}

    def exit_code(self) -> int:
        bad = [o for o in self.outcomes if o.status == "failed"]
        if not bad:
            return EXIT_OK
        if len(self.outcomes) == 1:
            return bad[0].code
        return EXIT_PARTIAL

    def table(self) -> list[dict]:
        """One row per request × model of this job's runs: the request, the model, its status there,
        and the request's verdict across the fleet (``erased``, ``rejected``, ``settled``, ``pending``)."""
        per: dict[tuple, dict[str, dict]] = {}
        order: list[tuple] = []
        for o in self.outcomes:
            for a in o.audits:
                for r in a.get("settled", []):
                    key = (r["request_id"], r["data_id"]) if r["status"] != "rejected" else (r["source"],)
                    if key not in per:
                        per[key] = {}
                        order.append(key)
                    applied = r["status"] == "applied" and a.get("new")
                    per[key][o.model] = {**r, "version": a["new"]["version"] if applied else None}
        failed = [o.model for o in self.outcomes if o.status != "done"]
        rows = []
        for key in order:
            by_model = per[key]
            statuses = {m: r["status"] for m, r in by_model.items()}
            first = next(iter(by_model.values()))
            if any(s == "rejected" for s in statuses.values()):
                verdict = "rejected"
            elif any(s == "applied" for s in statuses.values()):
                verdict = "erased"
            elif failed:
                verdict = "pending"
            elif all(s == "not present" for s in statuses.values()) and len(statuses) == len(self.outcomes):
                verdict = "rejected"
            else:
                verdict = "settled"
            for o in self.outcomes:
                r = by_model.get(o.model)
                rows.append({"request_id": first["request_id"], "data_id": first["data_id"], "source": first["source"],
                             "model": o.model,
                             "status": r["status"] if r else ("pending" if o.status != "done" else "—"),
                             "reason": (r or {}).get("reason"), "verdict": verdict,
                             "version": (r or {}).get("version")})
        return rows

    def summary(self) -> dict:
        """The job's result line."""
        rows = self.table()
        verdicts: dict[tuple, str] = {}
        for r in rows:
            verdicts[(r["source"], r["request_id"], r["data_id"])] = r["verdict"]
        published = {o.model: a["new"]["version"] for o in self.outcomes for a in o.audits if a.get("new")}
        out = {"models": len(self.outcomes), "received": len(self.inbox.requests),
               "applied": sum(a["requests"].get("applied", 0) for o in self.outcomes for a in o.audits),
               "rejected": sum(v == "rejected" for v in verdicts.values()),
               "runs": [a["run_id"] for o in self.outcomes for a in o.audits], "published": published,
               "not_read": [f for f, _ in self.inbox.not_read]}
        if self.failed:
            out["failed"] = self.failed
        if self.busy:
            out["busy"] = self.busy
        return out


def erase_fleet(fleet: Fleet, *, address: str | None = None, workers: int = 1,
                notify: Callable[[str], None] | None = None) -> FleetResult:
    """Erase the pending requests of the inbox from every model of the fleet.

    The inbox is read once here; each model's erasure is then one task (:func:`run_target`): in this
    process one after another when ``workers`` is 1 and no ``address`` is given, else on Ray
    (``address``: a cluster, ``None``: a local Ray), at most ``workers`` at a time, each with its
    model's resources. A task that dies (a lost node) is retried by Ray (it resumes from the model's
    markers; the lease is taken over by the job's holder name) and otherwise reported as failed.

    Args:
      fleet: the models, the inbox and the shared settings.
      address: the Ray cluster (None: local).
      workers: models erased at once.
      notify: called with one line per model started and finished (progress, ``ray job logs``).

    Returns:
      :class:`FleetResult`.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be an integer >= 1, got {workers!r}")
    say = notify or (lambda line: None)
    inbox = read_inbox(fleet.requests)
    say(f"inbox {location(fleet.requests).uri}: {len(inbox.requests)} request row(s), "
        f"{len(inbox.not_read)} file(s) not read")
    outcomes: dict[str, ModelOutcome] = {}
    if address is None and (workers == 1 or len(fleet.models) == 1):
        for t in fleet.models:
            say(f"model {t.name}: erasing")
            outcomes[t.name] = o = run_target(t, fleet.requests, fleet.settings, inbox)
            say(_line(o))
    else:
        outcomes = _on_ray(fleet, inbox, address, workers, say)
    return FleetResult(tuple(outcomes[t.name] for t in fleet.models), inbox)


def _line(o: ModelOutcome) -> str:
    if o.status == "done":
        pub = [a["new"]["version"] for a in o.audits if a.get("new")]
        return (f"model {o.model}: done in {o.seconds:.1f} s, {len(o.audits)} run(s)"
                + (f", published version {pub[-1]}" if pub else ", nothing to publish"))
    return f"model {o.model}: {o.status}: {o.message}"


def _on_ray(fleet: Fleet, inbox: Inbox, address: str | None, workers: int,
            say: Callable[[str], None]) -> dict[str, ModelOutcome]:
    import ray

    from ..distributed.session import ensure_ray
    ensure_ray(address)
    snapshot = ray.put(inbox)
    task = ray.remote(run_target)
    todo: list[Target] = list(fleet.models)
    running: dict = {}
    out: dict[str, ModelOutcome] = {}
    while todo or running:
        while todo and len(running) < workers:
            t = todo.pop(0)
            ref = task.options(num_cpus=t.num_cpus, num_gpus=t.num_gpus, resources=dict(t.resources) or None,
                               max_retries=2, name=f"erasure:{t.name}").remote(t, fleet.requests, fleet.settings,
                                                                              snapshot)
            running[ref] = t
            say(f"model {t.name}: erasing on Ray ({t.num_cpus:g} CPU, {t.num_gpus:g} GPU)")
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            t = running.pop(ref)
            try:
                o = ray.get(ref)
            except Exception as e:  # the task itself died (its node lost, retries used up)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                o = ModelOutcome(t.name, "failed", (), "cluster", f"its task failed on the cluster: {first[:300]}")
                try:
                    Runs(t.output).record_failure(t.name, "cluster", o.message or "")
                except (StorageError, InputError):
                    pass
            out[t.name] = o
            say(_line(o))
    return out
