"""Results of a fan-out as they arrive: batches of requests (:class:`Job`), the collector that
keeps each finished batch (in memory up to ``max_model_mb``, and in the result parts), isolates a
request's own failure, and returns everything in request order (:class:`RunReport`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..core.data import ChangeSet
from ..core.errors import InputError
from ..core.replay import COUNTERS, ReplayState, failure_reason
from ..store.parts import ResultSink


class RunReport(NamedTuple):
    """Results of a fan-out, in request order.

    Fields:
      params:   (N, p) replayed parameters (NaN rows for failed requests), or None when they were
                too many to hold (more than ``max_model_mb``) and stay in the results' parts
      counters: name → (N,) int64 (explicit_steps, approx_steps, fallbacks, skipped_pairs)
      errors:   request index → reason, for requests that failed (isolated, not retried forever)
      stats:    batches, retries, seconds, backend
      models:   the parameters as a :class:`~deltagrad_ray.stats.ModelTable` (read a chunk at a time:
                from ``params``, or from the results' parts)
    """

    params: torch.Tensor | None
    counters: dict[str, torch.Tensor]
    errors: dict[int, str]
    stats: dict[str, Any]
    models: Any = None


@dataclass
class Job:
    members: list[int]                      # request indices
    changes: list[ChangeSet]
    stage: int = 0
    state: ReplayState | None = None        # after the last completed stage (CPU)
    failing_since: float | None = None      # first failure of the current stage (cluster faults)
    attempts: int = 0
    ref: Any = None                         # Ray: object ref of the changes
    extra: dict = field(default_factory=dict)

    def without(self, gone: Sequence[int]) -> Job | None:
        """The job without the requests at positions ``gone`` (None when nothing is left)."""
        keep = [i for i in range(len(self.members)) if i not in set(gone)]
        if not keep:
            return None
        state = self.state.select(keep) if self.state is not None else None
        return Job([self.members[i] for i in keep], [self.changes[i] for i in keep], self.stage, state)


MAX_MODEL_MB = 1024.0  # parameters held in memory at most (beyond: read back from the parts when needed)


class Collector:
    """Assembles results in request order, writes them to the sink as they arrive. The parameters
    are held in memory only when they fit ``max_model_mb`` (or there is no sink to keep them)."""

    def __init__(self, n: int, p: int, sink: ResultSink | None, progress: Callable[[int], None] | None,
                 max_model_mb: float = MAX_MODEL_MB, certify: Callable[[ReplayState], Any] | None = None) -> None:
        if not (isinstance(max_model_mb, (int, float)) and not isinstance(max_model_mb, bool)
                and max_model_mb >= 0 and not math.isnan(max_model_mb)):
            raise InputError(f"max_model_mb must be a number >= 0 (MB of models held in memory), got {max_model_mb!r}")
        self.n = n
        self.keep = sink is None or n * p * 8 <= max_model_mb * 2**20
        self.params = torch.full((n if self.keep else 0, p), float("nan"), dtype=torch.float64)
        self.counters = {k: torch.zeros(n, dtype=torch.int64) for k in COUNTERS}
        self.errors: dict[int, str] = {}
        self.done = torch.zeros(n, dtype=torch.bool)
        self.prediction_error = torch.full((n,), float("nan"), dtype=torch.float64)  # NaN: not measured here
        # each request's error estimate (core.certificate; NaN: failed, or resumed from parts without one)
        self.error_estimate = torch.full((n,), float("nan"), dtype=torch.float64)
        self.error_absolute = torch.full((n,), float("nan"), dtype=torch.float64)   # ≈ ‖θ_DG − θ_exact‖
        self.error_reliable = torch.zeros(n, dtype=torch.bool)
        self.sink, self.progress, self.certify = sink, progress, certify

    def restore(self, finished: dict[int, dict]) -> None:
        for i, r in finished.items():
            if self.keep:
                self.params[i] = torch.tensor(r["params"], dtype=torch.float64)
            for k in COUNTERS:
                self.counters[k][i] = int(r[k])
            if r.get("error_estimate") is not None:
                self.error_estimate[i] = float(r["error_estimate"])
                self.error_absolute[i] = float(r.get("error_absolute", float("nan")))
                self.error_reliable[i] = bool(r.get("error_reliable"))
            if r.get("error"):
                self.errors[i] = r["error"]
            self.done[i] = True

    def add(self, members: list[int], state: ReplayState | None, errors: dict[int, str]) -> None:
        """Requests ``members`` are finished: with their final ``state``, or failed with ``errors``."""
        idx = torch.tensor(members, dtype=torch.int64)
        W = torch.full((len(members), self.params.shape[1]), float("nan"), dtype=torch.float64)
        if state is not None:
            W = state.W.detach().cpu().double().clone()
            for k in COUNTERS:
                self.counters[k][idx] = getattr(state, k).cpu()
            self.prediction_error[idx] = torch.where(state.pred_n > 0, state.pred_sum / state.pred_n.clamp(min=1),
                                                     0.0).cpu().double()
            for j in torch.nonzero(state.failed_at >= 0).reshape(-1).tolist():
                errors = {**errors, members[j]: failure_reason(int(state.failed_at[j]))}
            if self.certify is not None:
                cert = self.certify(state)
                self.error_estimate[idx] = cert.ratio.cpu().double()
                self.error_absolute[idx] = cert.absolute.cpu().double()
                self.error_reliable[idx] = cert.reliable.cpu()
        self.errors.update(errors)
        for j, m in enumerate(members):
            if m in errors:
                W[j] = float("nan")
        if self.keep:
            self.params[idx] = W
        self.done[idx] = True
        if self.sink is not None:
            self.sink.write(members, W, {k: v[idx] for k, v in self.counters.items()},
                            {m: errors[m] for m in members if m in errors},
                            {"error_estimate": self.error_estimate[idx], "error_absolute": self.error_absolute[idx],
                             "error_reliable": self.error_reliable[idx]})
        if self.progress is not None:
            self.progress(len(members))

    def fail(self, job: Job, reasons: dict[int, str]) -> Job | None:
        """Report the requests of ``job`` at the positions in ``reasons``; the rest of the job goes on."""
        failed = [job.members[b] for b in reasons]
        self.add(failed, None, {job.members[b]: r[:300] for b, r in reasons.items()})
        return job.without(list(reasons))

    def report(self, stats: dict) -> RunReport:
        from ..stats.tables import TensorTable
        from ..store.parts import SinkTable
        models = TensorTable(self.params) if self.keep else SinkTable(self.sink.root, self.n)
        # stats["prediction_error_mean"]: (N,) each request's mean L-BFGS prediction error at its explicit steps;
        # stats["error_estimate"], ["error_absolute"], ["error_reliable"]: (N,) each request's error estimate
        # (core.certificate: the ratio to the request's effect, and ‖θ_DG − θ_exact‖ itself)
        stats = {**stats, "models_in_memory": self.keep, "prediction_error_mean": self.prediction_error,
                 "error_estimate": self.error_estimate, "error_absolute": self.error_absolute,
                 "error_reliable": self.error_reliable}
        return RunReport(self.params if self.keep else None, self.counters, dict(sorted(self.errors.items())),
                         stats, models)


def batches(pending: Sequence[int], changes: Sequence[ChangeSet], batch_size: int) -> deque[Job]:
    return deque(Job(list(pending[i:i + batch_size]), [changes[j] for j in pending[i:i + batch_size]])
                 for i in range(0, len(pending), batch_size))


def certifier(cache) -> Callable[[ReplayState], Any]:
    """Prices finished states with the error estimate (:func:`~..core.replay.state_certificate`) from
    what the driver reads of the cache anyway: its final parameters and its schedule."""
    from ..core.replay import state_certificate
    final, kind = cache.final, getattr(cache.spec, "kind", None)
    max_lr, full_batch = float(cache.lrs.max()), cache.plan.full_batch
    return lambda st: state_certificate(st, final, kind=kind, max_lr=max_lr, full_batch=full_batch)


def prepare(changes, batch_size, sink, progress, p, max_model_mb=MAX_MODEL_MB, certify=None):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be an integer >= 1, got {batch_size!r}")
    col = Collector(len(changes), p, sink, progress, max_model_mb, certify)
    if sink is not None:
        col.restore(sink.load(len(changes), p))
    pending = [i for i in range(len(changes)) if not bool(col.done[i])]
    if progress is not None:
        if hasattr(progress, "set_total"):
            progress.set_total(len(changes))
        progress(len(changes) - len(pending))
    return col, pending
