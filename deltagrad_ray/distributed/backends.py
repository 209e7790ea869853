"""Fan-out of many change sets: a serial backend and a Ray backend that give the same results.

Requests are grouped into batches of B. A batch is the unit of work: it carries only its
state (parameters, L-BFGS histories, counters) between workers.

* ``serial``: one :class:`~.worker.ReplayWorker` in this process.
* ``ray``, pipeline mode: W shard actors each own a contiguous step range (loaded by the actor
  from the cache URI); a batch travels through them in step order, and up to ``max_in_flight``
  batches are in flight so every shard works at once.
* ``ray``, replicated mode: every actor holds all steps and takes a share of the batches.

The driver keeps each batch's last completed state. If an actor or its node dies, the batch is
re-run from that stage (bounded attempts); a request that makes the replay raise is isolated by
splitting its batch (requests are independent rows of the state) until it stands alone, then
reported with its error, as is one whose parameters come out NaN; the rest complete. Results
are written as they arrive (:class:`~.sink.ResultSink`) and returned in request order.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..core.batched import BatchedResult, BatchedState
from ..core.data import ChangeSet
from ..core.errors import InputError
from ..core.replay import DeltaGradConfig
from .sink import ResultSink
from .worker import ReplayWorker, slice_state

COUNTERS = ("explicit_steps", "approx_steps", "fallbacks", "skipped_pairs")


class RunReport(NamedTuple):
    """Results of a fan-out, in request order.

    Fields:
      params:   (N, p) replayed parameters (NaN rows for failed requests)
      counters: name → (N,) int64 (explicit_steps, approx_steps, fallbacks, skipped_pairs)
      errors:   request index → reason, for requests that failed (isolated, not retried forever)
      stats:    batches, retries, splits, seconds, backend
    """

    params: torch.Tensor
    counters: dict[str, torch.Tensor]
    errors: dict[int, str]
    stats: dict[str, Any]

    def as_batched(self) -> BatchedResult:
        c = self.counters
        return BatchedResult(self.params, -1, c["explicit_steps"], c["approx_steps"], c["fallbacks"],
                             c["skipped_pairs"])


@dataclass
class _Job:
    members: list[int]                      # request indices
    changes: list[ChangeSet]
    stage: int = 0
    state: BatchedState | None = None
    attempts: int = 0
    ref: Any = None                         # Ray: object ref of the changes
    extra: dict = field(default_factory=dict)

    def split(self) -> tuple[_Job, _Job]:
        h = len(self.members) // 2
        parts = []
        for sl in (slice(0, h), slice(h, None)):
            idx = torch.arange(len(self.members))[sl]
            st = slice_state(self.state, idx) if self.state is not None else None
            parts.append(_Job(self.members[sl], self.changes[sl], self.stage, st))
        return parts[0], parts[1]


class _Collector:
    """Assembles results in request order, writes them to the sink as they arrive."""

    def __init__(self, n: int, p: int, sink: ResultSink | None, progress: Callable[[int], None] | None) -> None:
        self.params = torch.full((n, p), float("nan"), dtype=torch.float64)
        self.counters = {k: torch.zeros(n, dtype=torch.int64) for k in COUNTERS}
        self.errors: dict[int, str] = {}
        self.done = torch.zeros(n, dtype=torch.bool)
        self.sink, self.progress = sink, progress

    def restore(self, finished: dict[int, dict]) -> None:
        for i, r in finished.items():
            self.params[i] = torch.tensor(r["params"], dtype=torch.float64)
            for k in COUNTERS:
                self.counters[k][i] = int(r[k])
            if r.get("error"):
                self.errors[i] = r["error"]
            self.done[i] = True

    def add(self, members: list[int], state: BatchedState | None, errors: dict[int, str]) -> None:
        idx = torch.tensor(members, dtype=torch.int64)
        if state is not None:
            bad = ~torch.isfinite(state.W).all(dim=1)
            for j in torch.nonzero(bad).reshape(-1).tolist():
                errors.setdefault(members[j], "the replay produced NaN or inf parameters")
            self.params[idx] = state.W.detach().cpu().double()
            for k in COUNTERS:
                self.counters[k][idx] = getattr(state, k).cpu()
        for m in members:
            if m in errors:
                self.params[m] = float("nan")
        self.errors.update({m: e for m, e in errors.items() if m in members})
        self.done[idx] = True
        if self.sink is not None:
            self.sink.write(members, self.params[idx], {k: v[idx] for k, v in self.counters.items()},
                            {m: e for m, e in errors.items() if m in members})
        if self.progress is not None:
            self.progress(len(members))

    def report(self, stats: dict) -> RunReport:
        return RunReport(self.params, self.counters, dict(sorted(self.errors.items())), stats)


def _user_error(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"[:300]


def _batches(pending: Sequence[int], changes: Sequence[ChangeSet], batch_size: int) -> deque[_Job]:
    return deque(_Job(list(pending[i:i + batch_size]), [changes[j] for j in pending[i:i + batch_size]])
                 for i in range(0, len(pending), batch_size))


def _prepare(changes, batch_size, sink, progress, p):
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    col = _Collector(len(changes), p, sink, progress)
    if sink is not None:
        col.restore(sink.load())
    pending = [i for i in range(len(changes)) if not bool(col.done[i])]
    if progress is not None:
        if hasattr(progress, "set_total"):
            progress.set_total(len(changes))
        progress(len(changes) - len(pending))
    return col, pending


class SerialBackend:
    """Runs the batches one after another in this process, with the same code as the Ray actors."""

    name = "serial"

    def __init__(self, threads: int | None = None, device: str = "cpu") -> None:
        self.threads, self.device = threads, device

    def run(self, cache_uri, data_uri: str | None, changes: Sequence[ChangeSet], *, batch_size: int = 32,
            config: DeltaGradConfig = DeltaGradConfig(), gemm_dtype=None, sink: ResultSink | None = None,
            progress: Callable[[int], None] | None = None, data=None) -> RunReport:
        """``cache_uri`` may be an open Cache and ``data`` its loaded Dataset (no reload)."""
        t0 = time.perf_counter()
        old = torch.get_num_threads()
        worker = ReplayWorker(cache_uri, data_uri, threads=self.threads, device=self.device, data=data)
        try:
            col, pending = _prepare(changes, batch_size, sink, progress, worker.traj.p)
            jobs = _batches(pending, changes, batch_size)
            splits = 0
            while jobs:
                job = jobs.popleft()
                try:
                    state = worker.advance(job.changes, config, gemm_dtype, job.state)
                except Exception as e:  # noqa: BLE001 - a request that breaks the replay is isolated, not fatal
                    if len(job.members) > 1:
                        a, b = job.split()
                        jobs.extendleft([b, a])
                        splits += 1
                    else:
                        col.add(job.members, None, {job.members[0]: _user_error(e)})
                    continue
                col.add(job.members, state, {})
        finally:
            torch.set_num_threads(old)
        return col.report({"backend": "serial", "seconds": time.perf_counter() - t0, "splits": splits,
                           "retries": 0, "batch_size": batch_size})


def _ray():
    import ray
    return ray


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray, unless already connected."""
    ray = _ray()
    if ray.is_initialized():
        return
    from ..store.s3 import environment_for_workers
    env = {"env_vars": environment_for_workers()} if environment_for_workers() else None
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:  # a local Ray: keep every process on loopback (see the tests' conftest)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    kwargs = {"include_dashboard": False, "log_to_driver": False, **init_kwargs}
    if env:
        kwargs["runtime_env"] = env
    if address:
        kwargs.pop("num_cpus", None)
    ray.init(address=address, **kwargs)


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
      max_attempts: attempts of one stage of a batch when actors or nodes die.
      device: torch device inside the actors (``cuda`` with num_gpus).
      data_shards: split the training data over this many data actors (each holding a
        contiguous row range; replay actors then hold ids and labels only and sum the shards'
        partial gradients at explicit steps), or ``"auto"``: as many as the data needs to fit
        ``actor_memory_mb`` each, none when it fits one actor.
      data_cpus: CPUs per data actor.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, workers: int = 2, mode: str = "auto", num_cpus: float = 1,
                 num_gpus: float = 0, resources: dict[str, float] | None = None, strategy: str = "SPREAD",
                 max_in_flight: int | None = None, actor_memory_mb: float = 2048, max_attempts: int = 4,
                 device: str = "cpu", ready_timeout: float = 120.0, data_shards: int | str = "auto",
                 data_cpus: float = 0.5) -> None:
        if mode not in ("auto", "pipeline", "replicated"):
            raise InputError(f"mode must be auto, pipeline or replicated, got {mode!r}")
        if strategy not in ("SPREAD", "PACK"):
            raise InputError(f"placement strategy must be SPREAD or PACK, got {strategy!r}")
        if workers < 1:
            raise InputError(f"workers must be >= 1, got {workers}")
        self.address, self.workers, self.mode = address, workers, mode
        self.num_cpus, self.num_gpus, self.resources = num_cpus, num_gpus, dict(resources or {})
        self.strategy, self.max_attempts, self.device = strategy, max_attempts, device
        self.max_in_flight = max_in_flight or 2 * workers
        self.actor_memory = actor_memory_mb * 2 ** 20
        self.ready_timeout = ready_timeout
        if not (data_shards == "auto" or (isinstance(data_shards, int) and data_shards >= 0)):
            raise InputError(f"data_shards must be 'auto' or an integer >= 0, got {data_shards!r}")
        self.data_shards, self.data_cpus = data_shards, data_cpus
        self.actors: list = []
        self.data_actors: list = []
        self.info: list[dict] = []
        self.data_info: list[dict] = []

    # -- actors ---------------------------------------------------------------------------------
    def _ranges(self, cache) -> list[tuple[int, int]]:
        """Contiguous step ranges, one per actor, cut at shard boundaries when possible."""
        T, W = cache.steps, self.workers
        bounds = [round(T * k / W) for k in range(W + 1)]
        shard_starts = sorted({s["start"] for s in cache.manifest["shards"]} | {T})
        if len(shard_starts) - 1 >= W:  # snap to the nearest shard boundary
            bounds = [min(shard_starts, key=lambda s, b=b: abs(s - b)) for b in bounds]
            bounds[0], bounds[-1] = 0, T
        bounds = sorted(set(bounds))
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def _data_mb(cache) -> float:
        info = cache.manifest["data"]
        return int(info["n"]) * int(info["d"]) * torch.empty(0, dtype=cache.dtype).element_size() / 2**20

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

    def start(self, cache_uri: str, data_uri: str | None) -> str:
        ray = _ray()
        ensure_ray(self.address)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ..store.cache import open_cache
        cache = open_cache(cache_uri)
        mode = self._choose_mode(cache)
        ranges = self._ranges(cache) if mode == "pipeline" else [None] * self.workers
        threads = max(1, int(self.num_cpus))
        bundle = {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {}), **self.resources}
        D = self._choose_data_shards(cache)
        need = len(ranges) * self.num_cpus + D * self.data_cpus
        have = ray.cluster_resources().get("CPU", 0)
        if need > have:  # fail now rather than wait for actors that can never be placed
            data = f" + {D} data actors × {self.data_cpus} CPU" if D else ""
            why = (f" ({self._data_mb(cache):.1f} MB of features over actors of at most "
                   f"{self.actor_memory / 2**20:g} MB: raise actor_memory_mb or add nodes)") if D else ""
            raise InputError(f"the cluster has {have:g} CPUs, the replay needs {need:g}: {len(ranges)} workers × "
                             f"{self.num_cpus} CPU{data}{why}")
        names = self._start_data_shards(cache, cache_uri, data_uri, threads, D)
        self.pg = placement_group([dict(bundle) for _ in ranges], strategy=self.strategy)
        try:
            ray.get(self.pg.ready(), timeout=self.ready_timeout)
        except Exception:
            ray.util.remove_placement_group(self.pg)
            self.pg = None
            self.stop()  # the data actors, if any
            raise InputError(f"the cluster cannot place {len(ranges)} workers with {bundle} each "
                             f"({self.strategy}); available: {ray.available_resources()}") from None
        Actor = ray.remote(ReplayWorker)
        self.actors = [Actor.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, resources=self.resources,
                                     max_restarts=-1, max_task_retries=0,
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, k))
                       .remote(cache_uri, data_uri, r, threads, self.device, None, names or None)
                       for k, r in enumerate(ranges)]
        self.info = ray.get([a.info.remote() for a in self.actors])
        self.ranges, self.run_mode, self.p = ranges, mode, cache.model.p
        return mode

    def _start_data_shards(self, cache, cache_uri: str, data_uri: str | None, threads: int, D: int) -> list[str]:
        """D data actors for the data-parallel mode, by name (replay actors look them up: URIs and
        names only in constructors, so restarted actors rebuild themselves)."""
        if D == 0:
            return []
        import uuid
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .datashard import DataShard
        self.data_pg = placement_group([{"CPU": self.data_cpus} for _ in range(D)], strategy=self.strategy)
        try:
            ray.get(self.data_pg.ready(), timeout=self.ready_timeout)
        except Exception:
            ray.util.remove_placement_group(self.data_pg)
            self.data_pg = None
            raise InputError(f"the cluster cannot place {D} data actors with {self.data_cpus} CPU each "
                             f"({self.strategy}); available: {ray.available_resources()}") from None
        n = cache.n_rows
        bounds = [round(n * k / D) for k in range(D + 1)]
        tag = uuid.uuid4().hex[:8]
        Data = ray.remote(DataShard)
        names = [f"deltagrad-data-{tag}-{k}" for k in range(D)]
        self.data_actors = [Data.options(name=name, num_cpus=self.data_cpus, max_restarts=-1, max_task_retries=0,
                                         scheduling_strategy=PlacementGroupSchedulingStrategy(self.data_pg, k))
                            .remote(cache_uri, data_uri, (a, b), threads, self.device)
                            for k, (name, a, b) in enumerate(zip(names, bounds[:-1], bounds[1:]))]
        self.data_info = ray.get([a.info.remote() for a in self.data_actors])
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
        from ..store.location import portable_uri
        cache_uri = portable_uri(cache_uri if isinstance(cache_uri, str) else cache_uri.root)
        data_uri = None if data_uri is None else portable_uri(data_uri)
        own = not self.actors
        if own:
            self.start(cache_uri, data_uri)
        try:
            if self.data_actors and gemm_dtype is not None:
                raise InputError("gemm_dtype is not available with data shards (data_shards=0 to use it)")
            col, pending = _prepare(changes, batch_size, sink, progress, self.p)
            jobs = _batches(pending, changes, batch_size)
            stages = len(self.ranges) if self.run_mode == "pipeline" else 1
            inflight: dict = {}
            busy = [0] * len(self.actors)
            stats = {"backend": "ray", "mode": self.run_mode, "workers": len(self.actors), "retries": 0,
                     "splits": 0, "stages_done": 0, "batch_size": batch_size}

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

            while jobs or inflight:
                while jobs and len(inflight) < self.max_in_flight:
                    submit(jobs.popleft())
                ready, _ = ray.wait(list(inflight), num_returns=1)
                job = inflight.pop(ready[0])
                busy[job.extra["actor"]] -= 1
                try:
                    state = ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e, ray.exceptions.RayActorError) or not _is_user_error(e):
                        self._retry(job, e, jobs, col, stats)
                        continue
                    if len(job.members) > 1:  # isolate the request that breaks the replay
                        a, b = job.split()
                        jobs.extendleft([b, a])
                        stats["splits"] += 1
                    else:
                        col.add(job.members, None, {job.members[0]: _user_error(e)})
                    continue
                except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError,
                        ray.exceptions.ObjectLostError) as e:
                    self._retry(job, e, jobs, col, stats)
                    continue
                job.state, job.stage, job.attempts = state, job.stage + 1, 0
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

    def _retry(self, job: _Job, error: BaseException, jobs: deque, col: _Collector, stats: dict) -> None:
        """An actor or node died: re-run the batch from its last completed stage (bounded)."""
        job.attempts += 1
        stats["retries"] += 1
        if job.attempts > self.max_attempts:
            col.add(job.members, None, {m: f"gave up after {self.max_attempts} attempts: {type(error).__name__}"
                                        for m in job.members})
            return
        time.sleep(min(0.2 * job.attempts, 2.0))  # give the actor time to restart
        job.ref = None  # the changes' object may have lived on the lost node
        jobs.appendleft(job)


def _is_user_error(e: BaseException) -> bool:
    """True when the replay code raised (a poisoned request), False when Ray itself failed."""
    ray = _ray()
    cause = getattr(e, "cause", None)
    return cause is not None and not isinstance(cause, (ray.exceptions.RayError,))


def backend(name: str, **kwargs):
    """``serial`` or ``ray`` (kwargs go to :class:`RayBackend`)."""
    if name == "serial":
        return SerialBackend(threads=kwargs.get("threads"), device=kwargs.get("device", "cpu"))
    if name == "ray":
        return RayBackend(**{k: v for k, v in kwargs.items() if k != "threads"})
    raise InputError(f"backend must be serial or ray, got {name!r}")
