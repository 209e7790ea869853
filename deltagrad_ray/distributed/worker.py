"""A replay worker: one step range of a cache plus the training data, advancing batch states.

The worker has no Ray in it: the serial backend uses it directly and the Ray shard actor
wraps it. It is built from URIs (never object references), so a restarted actor rebuilds
itself from storage. States cross process boundaries on the CPU: a worker replaying on a GPU
moves an incoming state to its device and hands back a CPU state, so a CPU-only driver (or
the next actor of a pipeline, on another device) can always read it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.config import DeltaGradConfig
from ..core.data import ChangeSet
from ..core.replay import Replay, ReplayState
from ..store.cache import open_cache


class ReplayWorker:
    """Holds steps [start, stop) of a cache in memory and replays batches over them.

    Args:
      cache_uri: the trajectory cache (or, in-process, an open Cache).
      data_uri: its training data (default: the location recorded in the cache).
      steps: (start, stop) step range owned; default all steps (replicated mode).
      threads: torch threads (results are bit-identical only at equal thread counts).
      device: torch device for the replay.
      data: in-process, the cache's already loaded Dataset (no reload).
      data_shards: names of DataShard actors holding the features (data-parallel mode).
    """

    def __init__(self, cache_uri, data_uri: str | None = None, steps: tuple[int, int] | None = None,
                 threads: int | None = None, device: str = "cpu", data=None,
                 data_shards: list[str] | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.cache = cache_uri if hasattr(cache_uri, "manifest") else open_cache(cache_uri)
        self.rows = None
        if data_shards:  # data-parallel: the features live on DataShard actors, found by name
            import ray

            from ..store.cache import labels_only
            from .datashard import RemoteRows
            self.data = labels_only(self.cache, data_uri).to(device=device)
            actors = [ray.get_actor(name) for name in data_shards]
            ranges = ray.get([a.info.remote() for a in actors])
            self.rows = RemoteRows([(a, *r["range"]) for a, r in zip(actors, ranges)], self.cache.plan.n_base,
                                   device, width=self.cache.spec.n_features, dtype=self.cache.dtype)
        else:
            self.data = data if data is not None else self.cache.data(data_uri, device=device)
        self.traj = self.cache.trajectory(device)
        self.range = steps or (0, self.traj.steps)
        self.segments = [s if s.params.device == torch.device(device) else
                         type(s)(s.start, s.params.to(device), s.grads.to(device), s.lrs)
                         for s in self.traj.segments(*self.range)]
        self.device = device

    def info(self) -> dict:
        import os
        import socket
        held = sum(s.params.element_size() * (s.params.numel() + s.grads.numel()) for s in self.segments)
        data_bytes = self.data.X.element_size() * self.data.X.numel()
        return {"range": list(self.range), "bytes": held, "data_bytes": data_bytes, "pid": os.getpid(),
                "host": socket.gethostname(), "threads": torch.get_num_threads(), "device": self.device}

    def advance(self, changes: Sequence[ChangeSet], config: DeltaGradConfig, gemm_dtype,
                state: ReplayState | None) -> ReplayState:
        """Run a batch over this worker's steps, from ``state`` (None: the start of the trajectory).
        Returns the state on the CPU.

        Raises:
          RequestError: for requests that cannot be replayed (the caller isolates them).
        """
        changes = [ChangeSet(c.delete.to(self.device), None if c.add is None else c.add.to(device=self.device))
                   for c in changes]
        rp = Replay(self.cache.model, self.traj, self.data, changes, config, gemm_dtype=gemm_dtype, rows=self.rows)
        state = rp.start() if state is None else state.to(self.device)
        if state.step != self.range[0]:
            raise ValueError(f"the batch is at step {state.step}, this worker starts at step {self.range[0]}")
        for seg in self.segments:
            state = rp.run_segment(state, seg)
        return state.to("cpu")
