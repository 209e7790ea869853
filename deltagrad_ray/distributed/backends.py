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

Results are written as they arrive (:class:`~deltagrad_ray.store.parts.ResultSink`) and returned in
request order (:mod:`.collect`). Connecting to Ray is :mod:`.session`'s; what a cluster can hold,
:mod:`.capacity`'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from ..core.config import DeltaGradConfig
from ..core.data import ChangeSet
from ..core.errors import InputError
from ..core.replay import RequestError
from ..store.location import StorageError
from ..store.parts import ResultSink
from .capacity import check_fits, short_resources
from .collect import MAX_MODEL_MB, Collector, Job, RunReport, batches, certifier, prepare
from .errors import keeps_init_error, local_error
from .session import (CONNECT_TIMEOUT_S, address_endpoint, cluster_failure_types, ensure_ray, get, notice,
                      ray_module)
from .worker import ReplayWorker


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
            col, pending = prepare(changes, batch_size, sink, progress, worker.traj.p, self.max_model_mb,
                                    certifier(worker.cache))
            jobs = batches(pending, changes, batch_size)
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
                 notify: Callable[[str], None] = notice, max_model_mb: float = MAX_MODEL_MB,
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
            address_endpoint(address)  # a malformed address is refused before any work
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

    def _wait_placed(self, pg, what: str, bundles: list[dict], growable: bool) -> None:
        """Wait for a placement group up to ``resource_timeout``, saying what is awaited (every 30 s)."""
        ray = ray_module()
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
                                 f"{short_resources(ray.available_resources())}") from None
            grows = " (the cluster may be scaling up)" if growable else ""
            self.notify(f"waiting for {len(bundles)} {what}s of {bundles[0]} ({self.strategy}){grows}; free now: "
                        f"{short_resources(ray.available_resources())}; {left:.0f} s left of {self.resource_timeout:g}")
            wait = min(30.0, left)

    def _check_locations(self, uris: list) -> None:
        """Local paths are resolved on each node: refuse them on a cluster spanning several hosts."""
        if self.shared_filesystem:
            return
        ray = ray_module()
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
        ray = ray_module()
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
        growable = check_fits(groups, why)
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
            self.info = get([a.info.remote() for a in self.actors])
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
        ray = ray_module()
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
        self.data_info = get([a.info.remote() for a in self.data_actors])
        return names

    def stop(self) -> None:
        ray = ray_module()
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
        ray = ray_module()
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
        cluster_faults = cluster_failure_types()
        try:
            if self.data_actors and gemm_dtype is not None:
                raise InputError("gemm_dtype is not available with data shards (data_shards=0 to use it)")
            col, pending = prepare(changes, batch_size, sink, progress, self.p, self.max_model_mb, self.certify)
            jobs = batches(pending, changes, batch_size)
            stages = len(self.ranges) if self.run_mode == "pipeline" else 1
            inflight: dict = {}
            busy = [0] * len(self.actors)
            stats = {"backend": "ray", "mode": self.run_mode, "workers": len(self.actors), "retries": 0,
                     "stages_done": 0, "batch_size": batch_size}
            waiting: list[tuple[float, Job]] = []   # (not before, job): retries backing off

            def submit(job: Job) -> None:
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

    def _retry(self, job: Job, error: BaseException, waiting: list, col: Collector, stats: dict) -> None:
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


def backend(name: str, **kwargs):
    """``serial`` or ``ray`` (kwargs go to :class:`RayBackend`)."""
    if name == "serial":
        return SerialBackend(threads=kwargs.get("threads"), device=kwargs.get("device") or "cpu",
                             max_model_mb=kwargs.get("max_model_mb", MAX_MODEL_MB))
    if name == "ray":
        return RayBackend(**{k: v for k, v in kwargs.items() if k != "threads"})
    raise InputError(f"backend must be serial or ray, got {name!r}")
