"""Fan-out of many change sets: a serial backend and a Ray backend that give the same results.

Requests are grouped into batches of B. A batch is the unit of work: it carries only its
state (parameters, L-BFGS histories, counters) between workers, always on the CPU.

* ``serial``: one :class:`~.worker.ReplayWorker` in this process.
* ``ray``, pipeline mode: W shard actors each own a contiguous step range (loaded by the actor
  from the cache URI); a batch travels through them in step order, and up to ``max_in_flight``
  batches are in flight so every shard works at once.
* ``ray``, replicated mode: every actor holds all steps and takes a share of the batches.

Failures fall in three kinds, handled at this boundary:

* **a request's own failure** — a change set invalid for the trajectory
  (:class:`~deltagrad_ray.core.replay.RequestError`), or parameters that became non-finite (the
  state's ``failed_at``) — that request is reported with its reason and the rest of its batch
  goes on, unaffected;
* **the cluster's failure** (an actor or node died, an object was lost) — the batch's stage is
  re-run from its last completed state, with backoff, for as long as ``retry_budget_s`` allows
  (a replacement node can take minutes);
* **anything else** is a bug: the run stops at once and the error propagates with its traceback.

Results are written as they arrive (:class:`~deltagrad_ray.store.parts.ResultSink`) and returned in request order.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .. import environment
from ..core.config import DeltaGradConfig
from ..core.data import ChangeSet
from ..core.errors import InputError
from ..core.replay import COUNTERS, ReplayState, RequestError, failure_reason
from ..store.location import StorageError
from .errors import keeps_init_error, local_error
from ..store.parts import ResultSink
from .worker import ReplayWorker


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
class _Job:
    members: list[int]                      # request indices
    changes: list[ChangeSet]
    stage: int = 0
    state: ReplayState | None = None        # after the last completed stage (CPU)
    failing_since: float | None = None      # first failure of the current stage (cluster faults)
    attempts: int = 0
    ref: Any = None                         # Ray: object ref of the changes
    extra: dict = field(default_factory=dict)

    def without(self, gone: Sequence[int]) -> _Job | None:
        """The job without the requests at positions ``gone`` (None when nothing is left)."""
        keep = [i for i in range(len(self.members)) if i not in set(gone)]
        if not keep:
            return None
        state = self.state.select(keep) if self.state is not None else None
        return _Job([self.members[i] for i in keep], [self.changes[i] for i in keep], self.stage, state)


MAX_MODEL_MB = 1024.0  # parameters held in memory at most (beyond: read back from the parts when needed)


class _Collector:
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

    def fail(self, job: _Job, reasons: dict[int, str]) -> _Job | None:
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


def _batches(pending: Sequence[int], changes: Sequence[ChangeSet], batch_size: int) -> deque[_Job]:
    return deque(_Job(list(pending[i:i + batch_size]), [changes[j] for j in pending[i:i + batch_size]])
                 for i in range(0, len(pending), batch_size))


def certifier(cache) -> Callable[[ReplayState], Any]:
    """Prices finished states with the error estimate (:func:`~..core.replay.state_certificate`) from
    what the driver reads of the cache anyway: its final parameters and its schedule."""
    from ..core.replay import state_certificate
    final, kind = cache.final, getattr(cache.spec, "kind", None)
    max_lr, full_batch = float(cache.lrs.max()), cache.plan.full_batch
    return lambda st: state_certificate(st, final, kind=kind, max_lr=max_lr, full_batch=full_batch)


def _prepare(changes, batch_size, sink, progress, p, max_model_mb=MAX_MODEL_MB, certify=None):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be an integer >= 1, got {batch_size!r}")
    col = _Collector(len(changes), p, sink, progress, max_model_mb, certify)
    if sink is not None:
        col.restore(sink.load(len(changes), p))
    pending = [i for i in range(len(changes)) if not bool(col.done[i])]
    if progress is not None:
        if hasattr(progress, "set_total"):
            progress.set_total(len(changes))
        progress(len(changes) - len(pending))
    return col, pending


class SerialBackend:
    """Runs the batches one after another in this process, with the same code as the Ray actors."""

    name = "serial"

    def __init__(self, threads: int | None = None, device: str = "cpu", max_model_mb: float = MAX_MODEL_MB) -> None:
        self.threads, self.device, self.max_model_mb = threads, device, max_model_mb

    def run(self, cache_uri, data_uri: str | None, changes: Sequence[ChangeSet], *, batch_size: int = 32,
            config: DeltaGradConfig = DeltaGradConfig(), gemm_dtype=None, sink: ResultSink | None = None,
            progress: Callable[[int], None] | None = None, data=None) -> RunReport:
        """``cache_uri`` may be an open Cache and ``data`` its loaded Dataset (no reload)."""
        t0 = time.perf_counter()
        old = torch.get_num_threads()
        worker = ReplayWorker(cache_uri, data_uri, threads=self.threads, device=self.device,
                              data=None if data is None else data.to(device=self.device))
        try:
            col, pending = _prepare(changes, batch_size, sink, progress, worker.traj.p, self.max_model_mb,
                                    certifier(worker.cache))
            jobs = _batches(pending, changes, batch_size)
            while jobs:
                job = jobs.popleft()
                try:
                    state = worker.advance(job.changes, config, gemm_dtype, job.state)
                except RequestError as e:  # those requests fail; the rest of the batch is replayed
                    rest = col.fail(job, e.reasons)
                    if rest is not None:
                        jobs.appendleft(rest)
                    continue
                col.add(job.members, state, {})
        finally:
            torch.set_num_threads(old)
        return col.report({"backend": "serial", "seconds": time.perf_counter() - t0, "retries": 0,
                           "batch_size": batch_size})


def _ray():
    import ray
    return ray


CONNECT_TIMEOUT_S = 30.0  # how long ensure_ray waits for a Ray address to answer (Ray's own retries: minutes)


def _address_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for a Ray address ``HOST:PORT``, ``HOST`` (port 6379) or ``ray://HOST:PORT``
    (port 10001); None for ``auto`` and ``local``, which Ray resolves on this machine."""
    from ..store.s3 import shown
    if address in ("auto", "local"):
        return None
    text = address.strip()
    expected = "expected HOST:PORT (the head's GCS, port 6379 by default) or ray://HOST:PORT (Ray Client, 10001)"
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    if scheme in ("http", "https"):
        raise InputError(f"Ray address {shown(text)!r} is an HTTP address (the dashboard or job API), not a "
                         f"cluster's; {expected}")
    if scheme not in ("", "ray"):
        raise InputError(f"Ray address {shown(text)!r}: unknown scheme {scheme!r}; {expected}")
    if "@" in rest or "?" in rest or "#" in rest or "/" in rest.rstrip("/") or not rest.strip("/"):
        raise InputError(f"Ray address {shown(text)!r}: {expected}")
    rest = rest.rstrip("/")
    default = 10001 if scheme == "ray" else 6379
    if rest.startswith("["):  # [IPv6]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise InputError(f"Ray address {shown(text)!r}: {expected}")
    return host, int(port) if port else default


def check_ray_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`~deltagrad_ray.store.location.StorageError` unless something at ``address``
    accepts a connection and answers gRPC (as a Ray GCS or Ray Client server does) within
    ``timeout_s`` seconds; :class:`InputError` for an address that cannot be one. ``ray.init``
    itself retries an unreachable address for many minutes."""
    import socket

    from ..store.s3 import shown
    endpoint = _address_endpoint(address)
    if endpoint is None:
        return
    host, port = endpoint
    deadline = time.monotonic() + timeout_s
    hint = "check --address (or RAY_ADDRESS) and that the cluster is up"
    while True:  # 1. something accepts connections (a head that is starting may take a few seconds)
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(5.0, deadline - time.monotonic()))):
                break
        except OSError as e:
            why = e.strerror or str(e) or type(e).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise StorageError(f"Ray cluster at {shown(address)}: cannot connect ({why}) within {timeout_s:g} s; "
                               f"{hint}")
        time.sleep(min(0.5, left))
    try:  # 2. it speaks gRPC: a port that accepts and never answers would keep ray.init waiting
        import grpc
        try:
            from ray._private.grpc_utils import init_grpc_channel  # TLS and token settings as Ray uses them
            channel = init_grpc_channel(f"{host}:{port}")
        except Exception:  # noqa: BLE001 - an older or newer Ray: a plain channel
            channel = grpc.insecure_channel(f"{host}:{port}")
    except ImportError:  # no grpc: the connection above is all we can check
        return
    try:
        grpc.channel_ready_future(channel).result(timeout=max(0.05, deadline - time.monotonic()))
    except grpc.FutureTimeoutError:
        raise StorageError(f"Ray cluster at {shown(address)}: {host}:{port} accepts connections but does not answer "
                           f"as a Ray cluster within {timeout_s:g} s; is it the head's GCS port (6379 by default) or "
                           f"the Ray Client port (ray://…:10001)? {hint}") from None
    finally:
        channel.close()


def ensure_ray(address: str | None = None, *, connect_timeout_s: float = CONNECT_TIMEOUT_S, **init_kwargs) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray of this process's own, unless
    already connected. A local Ray listens on loopback only, and never joins another Ray found on
    the machine (``ray.init()`` without an address would).

    An address where nothing answers fails within ``connect_timeout_s`` seconds (default 30) with
    a :class:`~deltagrad_ray.store.location.StorageError` (:func:`check_ray_address`), instead of
    Ray's own retries (minutes).
    """
    if not (isinstance(connect_timeout_s, (int, float)) and not isinstance(connect_timeout_s, bool)
            and math.isfinite(connect_timeout_s) and connect_timeout_s > 0):
        raise InputError(f"connect_timeout_s must be a number of seconds > 0, got {connect_timeout_s!r}")
    address = address or environment.ray_address()
    if not address:  # Ray reads this when first imported: set it before
        environment.set_default("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = _ray()
    if ray.is_initialized():
        return
    if address:
        check_ray_address(address, connect_timeout_s)
    from ..store.s3 import environment_for_workers
    env = {"env_vars": environment_for_workers()} if environment_for_workers() else None
    kwargs = {"include_dashboard": False, "log_to_driver": False, **init_kwargs}
    if env:
        kwargs["runtime_env"] = env
    if address:
        kwargs.pop("num_cpus", None)
        ray.init(address=address, **kwargs)
    else:  # on loopback even if Ray was imported before the setting above
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)


def _get(refs):
    """``ray.get``; the project's errors raised on a worker (or while building an actor) are raised
    as themselves: their type and one-line message, as in process."""
    ray = _ray()
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = local_error(e)
        if isinstance(cause, (InputError, StorageError)):
            raise cause from None
        raise


def _notice(message: str) -> None:
    print(f"deltagrad-ray: {message}", file=sys.stderr, flush=True)


def _cluster_failure_types() -> tuple[type[BaseException], ...]:
    """Errors of the cluster itself (not of the replay): retried within the budget."""
    ex = _ray().exceptions
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ObjectLostError", "OwnerDiedError",
             "ObjectFetchTimedOutError", "ObjectReconstructionFailedError", "NodeDiedError", "WorkerCrashedError",
             "RaySystemError", "LocalRayletDiedError", "TaskUnschedulableError", "ActorUnschedulableError")
    return tuple(getattr(ex, n) for n in names if hasattr(ex, n))


class RayBackend:
    """Shard actors on a Ray cluster.

    Args:
      address: Ray cluster address (default: ``RAY_ADDRESS``, else a local Ray).
      workers: number of actors.
      mode: ``pipeline`` (each actor owns a step range), ``replicated`` (each holds every step),
        or ``auto``: replicated when the in-memory trajectory fits ``actor_memory_mb``.
      num_cpus, num_gpus, resources: per actor (fractional GPUs allowed; custom resources can
        stand in for GPUs in tests).
      strategy: placement of the actors across nodes, ``SPREAD`` or ``PACK``.
      max_in_flight: batches in flight (default 2 × workers).
      device: torch device inside the actors (default ``cuda`` when ``num_gpus`` > 0, else ``cpu``).
      resource_timeout: seconds to wait for the cluster to provide the actors' resources (an
        autoscaling cluster grows into them; a lost node is replaced) before giving up. A request
        that can never fit — more than any node or the whole cluster can hold — is refused at once.
      retry_budget_s: how long one stage of a batch may keep failing on cluster faults (actor or
        node died) before its requests are reported as failed; retries back off up to 30 s.
      data_shards: split the training data over this many data actors (each holding a
        contiguous row range; replay actors then hold ids and labels only and sum the shards'
        partial gradients at explicit steps), or ``"auto"``: as many as the data needs to fit
        ``actor_memory_mb`` each, none when it fits one actor.
      data_cpus, data_gpus: per data actor (``data_gpus`` default: ``num_gpus`` when the device is
        CUDA, so data actors on GPUs reserve them like replay actors).
      shared_filesystem: local (``file://``) locations are readable on every node (an NFS mount):
        allow them on a cluster spanning several hosts.
      notify: where progress lines go (default: stderr).
      max_model_mb: replayed parameters held on the driver at most; beyond, with a results sink,
        they stay in its parts and the report reads them back a chunk at a time (``models``).
      connect_timeout_s: an ``address`` where nothing answers fails after this many seconds
        (:func:`ensure_ray`; a ``StorageError``, exit 3 on the command line) instead of Ray's own
        retries, which last minutes.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, workers: int = 2, mode: str = "auto", num_cpus: float = 1,
                 num_gpus: float = 0, resources: dict[str, float] | None = None, strategy: str = "SPREAD",
                 max_in_flight: int | None = None, actor_memory_mb: float = 2048, device: str | None = None,
                 resource_timeout: float = 900.0, retry_budget_s: float = 900.0, data_shards: int | str = "auto",
                 data_cpus: float = 0.5, data_gpus: float | None = None, shared_filesystem: bool = False,
                 notify: Callable[[str], None] = _notice, max_model_mb: float = MAX_MODEL_MB,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        if mode not in ("auto", "pipeline", "replicated"):
            raise InputError(f"mode must be auto, pipeline or replicated, got {mode!r}")
        if strategy not in ("SPREAD", "PACK"):
            raise InputError(f"placement strategy must be SPREAD or PACK, got {strategy!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InputError(f"workers must be an integer >= 1, got {workers!r}")
        for name, v, low in (("num_cpus", num_cpus, 0), ("num_gpus", num_gpus, None),
                             ("resource_timeout", resource_timeout, None), ("retry_budget_s", retry_budget_s, None),
                             ("data_cpus", data_cpus, None), ("actor_memory_mb", actor_memory_mb, 0),
                             ("max_model_mb", max_model_mb, None), ("connect_timeout_s", connect_timeout_s, 0)):
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and (v >= 0 if low is None else v > low)):
                raise InputError(f"{name} must be a finite number {'>= 0' if low is None else '> 0'}, got {v!r}")
        if max_in_flight is not None and (isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int)
                                          or max_in_flight < 1):
            raise InputError(f"max_in_flight must be an integer >= 1 (or None: 2 × workers), got {max_in_flight!r}")
        if address:
            _address_endpoint(address)  # a malformed address is refused before any work
        self.address, self.workers, self.mode = address, workers, mode
        self.num_cpus, self.num_gpus, self.resources = num_cpus, num_gpus, dict(resources or {})
        self.strategy = strategy
        self.device = device or ("cuda" if num_gpus else "cpu")
        self.max_in_flight = max_in_flight or 2 * workers
        self.actor_memory = actor_memory_mb * 2 ** 20
        self.resource_timeout, self.retry_budget_s = float(resource_timeout), float(retry_budget_s)
        if not (data_shards == "auto" or (isinstance(data_shards, int) and data_shards >= 0)):
            raise InputError(f"data_shards must be 'auto' or an integer >= 0, got {data_shards!r}")
        self.data_shards, self.data_cpus = data_shards, data_cpus
        self.data_gpus = (num_gpus if self.device.startswith("cuda") else 0.0) if data_gpus is None else data_gpus
        if not (isinstance(self.data_gpus, (int, float)) and not isinstance(self.data_gpus, bool)
                and math.isfinite(self.data_gpus) and self.data_gpus >= 0):
            raise InputError(f"data_gpus must be a finite number >= 0, got {self.data_gpus!r}")
        if not (self.data_cpus or self.data_gpus):
            raise InputError("data_cpus and data_gpus are both 0: a data actor needs some CPU or GPU")
        self.shared_filesystem, self.notify, self.max_model_mb = shared_filesystem, notify, max_model_mb
        self.connect_timeout_s = float(connect_timeout_s)
        self.actors: list = []
        self.data_actors: list = []
        self.info: list[dict] = []
        self.data_info: list[dict] = []
        self.pg = self.data_pg = None

    # -- sizing -----------------------------------------------------------------------------------
    def _ranges(self, cache) -> list[tuple[int, int]]:
        """Contiguous step ranges, one per actor, cut at shard boundaries when possible."""
        T, W = cache.steps, self.workers
        bounds = [round(T * k / W) for k in range(W + 1)]
        shard_starts = sorted({s.start for s in cache.manifest.shards} | {T})
        if len(shard_starts) - 1 >= W:  # snap to the nearest shard boundary
            bounds = [min(shard_starts, key=lambda s, b=b: abs(s - b)) for b in bounds]
            bounds[0], bounds[-1] = 0, T
        bounds = sorted(set(bounds))
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def _data_mb(cache) -> float:
        info = cache.manifest.data
        return info.n * info.d * torch.empty(0, dtype=cache.dtype).element_size() / 2**20

    def _choose_data_shards(self, cache) -> int:
        if self.data_shards != "auto":
            return int(self.data_shards)
        data_bytes = self._data_mb(cache) * 2**20
        return 0 if data_bytes <= self.actor_memory else math.ceil(data_bytes / self.actor_memory)

    def _choose_mode(self, cache) -> str:
        if self.mode != "auto":
            return self.mode
        in_memory = cache.steps * 2 * cache.model.p * torch.empty(0, dtype=cache.dtype).element_size()
        return "replicated" if in_memory <= self.actor_memory else "pipeline"

    def _bundle(self) -> dict[str, float]:
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {}), **self.resources}

    def _data_bundle(self) -> dict[str, float]:
        return {"CPU": self.data_cpus, **({"GPU": self.data_gpus} if self.data_gpus else {})}

    # -- what the cluster can hold ------------------------------------------------------------------
    def _check_fits(self, groups: list[tuple[int, dict[str, float], str]], detail: str) -> bool:
        """Refuse at once what can never fit; True when the cluster can grow (waiting makes sense).

        ``groups``: (count, bundle, what) of the actors to place. A static cluster (no autoscaler
        configuration) can hold at most what its nodes have now; an autoscaling one what its node
        groups can reach (Ray's own view of the cluster config, as Ray Train uses it)."""
        ray = _ray()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        node_max: dict[str, float] = {}
        for n in nodes:
            for k, v in n.get("Resources", {}).items():
                node_max[k] = max(node_max.get(k, 0.0), v)
        total = dict(ray.cluster_resources())
        grow = None
        try:
            from ray._private.state import state as _state
            grow = _state.get_max_resources_from_cluster_config()
            config = _state.get_cluster_config()
            if config is not None:
                for g in config.node_group_configs:
                    for k, v in g.resources.items():
                        node_max[k] = max(node_max.get(k, 0.0), float(v))
        except Exception:  # noqa: BLE001 - no autoscaler state (a local or static cluster)
            grow = None
        grow_to = grow or {}
        limit = {k: max(float(total.get(k, 0.0)), float(grow_to.get(k, 0.0))) for k in set(total) | set(grow_to)}
        need: dict[str, float] = {}
        for count, bundle, what in groups:
            for k, v in bundle.items():
                if v > node_max.get(k, 0.0) + 1e-9:
                    raise InputError(f"no node of this cluster can hold one {what} ({k} {v:g}; the largest node "
                                     f"has {node_max.get(k, 0.0):g}){detail}")
                need[k] = need.get(k, 0.0) + count * v
        for k, v in need.items():
            if v > limit.get(k, 0.0) + 1e-9:
                parts = " + ".join(f"{c} {what}s × {b.get(k, 0):g} {k}" for c, b, what in groups if b.get(k))
                grows = " at most, autoscaled" if grow else ""
                raise InputError(f"the cluster has {limit.get(k, 0.0):g} {k}s{grows}, the replay needs {v:g}: "
                                 f"{parts}{detail}")
        return grow is not None

    def _wait_placed(self, pg, what: str, bundles: list[dict], growable: bool) -> None:
        """Wait for a placement group up to ``resource_timeout``, saying what is awaited (every 30 s)."""
        ray = _ray()
        deadline = time.monotonic() + self.resource_timeout
        wait = min(2.0, self.resource_timeout)   # a cluster that has the resources places them at once
        while True:
            try:
                ray.get(pg.ready(), timeout=max(wait, 0.001))
                return
            except ray.exceptions.GetTimeoutError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                ray.util.remove_placement_group(pg)
                raise InputError(f"the cluster did not provide {len(bundles)} {what}s with {bundles[0]} each "
                                 f"({self.strategy}) within {self.resource_timeout:g} s; free now: "
                                 f"{_short(ray.available_resources())}") from None
            grows = " (the cluster may be scaling up)" if growable else ""
            self.notify(f"waiting for {len(bundles)} {what}s of {bundles[0]} ({self.strategy}){grows}; free now: "
                        f"{_short(ray.available_resources())}; {left:.0f} s left of {self.resource_timeout:g}")
            wait = min(30.0, left)

    def _check_locations(self, uris: list) -> None:
        """Local paths are resolved on each node: refuse them on a cluster spanning several hosts."""
        if self.shared_filesystem:
            return
        ray = _ray()
        hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive") and n.get("NodeManagerAddress")}
        if len(hosts) <= 1:
            return
        from ..store.location import location
        for uri in uris:
            if uri is not None and location(uri).is_local:
                shown = ", ".join(sorted(map(str, hosts)))
                raise InputError(f"{location(uri).uri} is a local path, but the Ray cluster spans {len(hosts)} hosts "
                                 f"({shown}): each node would read its own disk; use an s3:// location (or "
                                 "shared_filesystem=True if every node mounts this path)")

    # -- actors ---------------------------------------------------------------------------------
    def start(self, cache_uri: str, data_uri: str | None) -> str:
        ray = _ray()
        ensure_ray(self.address, connect_timeout_s=self.connect_timeout_s)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ..store.cache import open_cache
        cache = open_cache(cache_uri)
        self._check_locations([cache_uri, cache.data_location(data_uri)])
        mode = self._choose_mode(cache)
        ranges = self._ranges(cache) if mode == "pipeline" else [None] * self.workers
        threads = max(1, int(self.num_cpus))
        D = self._choose_data_shards(cache)
        why = (f" ({self._data_mb(cache):.1f} MB of features over actors of at most "
               f"{self.actor_memory / 2**20:g} MB: raise actor_memory_mb or add nodes)") if D else ""
        groups = [(len(ranges), self._bundle(), "worker")] + ([(D, self._data_bundle(), "data actor")] if D else [])
        growable = self._check_fits(groups, why)
        try:
            names = self._start_data_shards(cache, cache_uri, data_uri, threads, D, growable)
        except (InputError, StorageError):
            self.stop()  # the data actors started, if any
            raise
        bundles = [self._bundle() for _ in ranges]
        self.pg = placement_group(bundles, strategy=self.strategy)
        try:
            self._wait_placed(self.pg, "worker", bundles, growable)
        except InputError:
            self.pg = None
            self.stop()  # the data actors, if any
            raise
        Actor = ray.remote(keeps_init_error(ReplayWorker))  # a missing shard reaches the driver as a StorageError
        self.actors = [Actor.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, resources=self.resources,
                                     max_restarts=-1, max_task_retries=0,
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, k))
                       .remote(cache_uri, data_uri, r, threads, self.device, None, names or None)
                       for k, r in enumerate(ranges)]
        try:
            self.info = _get([a.info.remote() for a in self.actors])
        except (InputError, StorageError):
            self.stop()
            raise
        self.ranges, self.run_mode, self.p = ranges, mode, cache.model.p
        self.certify = certifier(cache)
        return mode

    def _start_data_shards(self, cache, cache_uri: str, data_uri: str | None, threads: int, D: int,
                           growable: bool) -> list[str]:
        """D data actors for the data-parallel mode, by name (replay actors look them up: URIs and
        names only in constructors, so restarted actors rebuild themselves)."""
        if D == 0:
            return []
        import uuid
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .datashard import DataShard
        bundles = [self._data_bundle() for _ in range(D)]
        self.data_pg = placement_group(bundles, strategy=self.strategy)
        try:
            self._wait_placed(self.data_pg, "data actor", bundles, growable)
        except InputError:
            self.data_pg = None
            raise
        n = cache.n_rows
        bounds = [round(n * k / D) for k in range(D + 1)]
        tag = uuid.uuid4().hex[:8]
        Data = ray.remote(keeps_init_error(DataShard))
        names = [f"deltagrad-data-{tag}-{k}" for k in range(D)]
        self.data_actors = [Data.options(name=name, num_cpus=self.data_cpus, num_gpus=self.data_gpus,
                                         max_restarts=-1, max_task_retries=0,
                                         scheduling_strategy=PlacementGroupSchedulingStrategy(self.data_pg, k))
                            .remote(cache_uri, data_uri, (a, b), threads, self.device)
                            for k, (name, a, b) in enumerate(zip(names, bounds[:-1], bounds[1:]))]
        self.data_info = _get([a.info.remote() for a in self.data_actors])
        return names

    def stop(self) -> None:
        ray = _ray()
        for a in self.actors + self.data_actors:
            ray.kill(a, no_restart=True)
        self.actors, self.data_actors, self.data_info = [], [], []
        for attr in ("pg", "data_pg"):
            if getattr(self, attr, None) is not None:
                ray.util.remove_placement_group(getattr(self, attr))
                setattr(self, attr, None)

    # -- the driver -------------------------------------------------------------------------------
    def run(self, cache_uri: str, data_uri: str | None, changes: Sequence[ChangeSet], *, batch_size: int = 32,
            config: DeltaGradConfig = DeltaGradConfig(), gemm_dtype=None, sink: ResultSink | None = None,
            progress: Callable[[int], None] | None = None, on_stage: Callable[[int], None] | None = None,
            data=None) -> RunReport:
        """Replay ``changes`` on the actors; ``on_stage(n)`` is called after each completed stage
        (tests use it to inject failures mid-run)."""
        ray = _ray()
        t0 = time.perf_counter()
        # actors load from the location, never from driver objects; the portable URIs carry the
        # S3 settings of this process (endpoint, region, profile given on the command line)
        from ..store.cache import open_cache
        from ..store.location import portable_uri
        if data_uri is None:  # the manifest's data URI, resolved here by the operator's settings (a stored
            # record: its own S3 settings count only if they are the operator's), then handed to the actors
            opened = cache_uri if hasattr(cache_uri, "manifest") else open_cache(cache_uri)
            data_uri = opened.data_location()
        cache_uri = portable_uri(cache_uri if isinstance(cache_uri, str) else cache_uri.root)
        data_uri = portable_uri(data_uri)
        own = not self.actors
        if own:
            self.start(cache_uri, data_uri)
        cluster_faults = _cluster_failure_types()
        try:
            if self.data_actors and gemm_dtype is not None:
                raise InputError("gemm_dtype is not available with data shards (data_shards=0 to use it)")
            col, pending = _prepare(changes, batch_size, sink, progress, self.p, self.max_model_mb, self.certify)
            jobs = _batches(pending, changes, batch_size)
            stages = len(self.ranges) if self.run_mode == "pipeline" else 1
            inflight: dict = {}
            busy = [0] * len(self.actors)
            stats = {"backend": "ray", "mode": self.run_mode, "workers": len(self.actors), "retries": 0,
                     "stages_done": 0, "batch_size": batch_size}
            waiting: list[tuple[float, _Job]] = []   # (not before, job): retries backing off

            def submit(job: _Job) -> None:
                if job.ref is None:
                    job.ref = ray.put(job.changes)
                if self.run_mode == "pipeline":
                    k = job.stage
                else:  # replicated: the least busy actor
                    k = min(range(len(self.actors)), key=lambda i: busy[i])
                job.extra["actor"] = k
                busy[k] += 1
                inflight[self.actors[k].advance.remote(job.ref, config, gemm_dtype, job.state)] = job

            while jobs or inflight or waiting:
                now = time.monotonic()
                for item in [w for w in waiting if w[0] <= now]:
                    waiting.remove(item)
                    jobs.appendleft(item[1])
                while jobs and len(inflight) < self.max_in_flight:
                    submit(jobs.popleft())
                if not inflight:
                    time.sleep(max(0.0, min(w[0] for w in waiting) - time.monotonic()))
                    continue
                timeout = max(0.0, min(w[0] for w in waiting) - time.monotonic()) if waiting else None
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=timeout)
                if not ready:
                    continue
                job = inflight.pop(ready[0])
                busy[job.extra["actor"]] -= 1
                try:
                    state = ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, RequestError):  # those requests fail; the rest goes on
                        rest = col.fail(job, cause.reasons)
                        if rest is not None:
                            jobs.appendleft(rest)
                        continue
                    if isinstance(e, cluster_faults) or isinstance(cause, cluster_faults):
                        self._retry(job, e, waiting, col, stats)
                        continue
                    if isinstance(local_error(e), (InputError, StorageError)):  # as in process: stop the run
                        raise local_error(e) from None
                    raise e.as_instanceof_cause() from None  # a bug in the replay: stop the run
                except cluster_faults as e:
                    self._retry(job, e, waiting, col, stats)
                    continue
                job.state, job.stage, job.attempts, job.failing_since = state, job.stage + 1, 0, None
                stats["stages_done"] += 1
                if on_stage is not None:
                    on_stage(stats["stages_done"])
                if job.stage == stages:
                    col.add(job.members, state, {})
                else:
                    jobs.appendleft(job)  # the next stage goes first: finish batches before starting new ones
            stats["seconds"] = time.perf_counter() - t0
            stats["actors"] = self.info
            stats["data_shards"] = self.data_info
            return col.report(stats)
        finally:
            if own:
                self.stop()

    def _retry(self, job: _Job, error: BaseException, waiting: list, col: _Collector, stats: dict) -> None:
        """An actor or node died: re-run the batch from its last completed stage, backing off, while
        the stage's failures stay within ``retry_budget_s`` (a replaced node can take minutes)."""
        now = time.monotonic()
        job.failing_since = job.failing_since or now
        job.attempts += 1
        stats["retries"] += 1
        if now - job.failing_since > self.retry_budget_s:
            reason = (f"gave up after {job.attempts} attempts over {now - job.failing_since:.0f} s "
                      f"(retry budget {self.retry_budget_s:g} s): {type(error).__name__}")
            col.add(job.members, None, {m: reason for m in job.members})
            return
        job.ref = None  # the changes' object may have lived on the lost node
        delay = min(0.5 * 2 ** (job.attempts - 1), 30.0)
        if job.attempts in (1, 4, 8) or job.attempts % 16 == 0:
            self.notify(f"a batch of {len(job.members)} requests lost its actor ({type(error).__name__}); "
                        f"retry {job.attempts} in {delay:g} s "
                        f"({self.retry_budget_s - (now - job.failing_since):.0f} s of the retry budget left)")
        waiting.append((now + delay, job))


def _short(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if not k.startswith("node:")
                     and k not in ("memory", "object_store_memory")) or "nothing"


def backend(name: str, **kwargs):
    """``serial`` or ``ray`` (kwargs go to :class:`RayBackend`)."""
    if name == "serial":
        return SerialBackend(threads=kwargs.get("threads"), device=kwargs.get("device") or "cpu",
                             max_model_mb=kwargs.get("max_model_mb", MAX_MODEL_MB))
    if name == "ray":
        return RayBackend(**{k: v for k, v in kwargs.items() if k != "threads"})
    raise InputError(f"backend must be serial or ray, got {name!r}")
