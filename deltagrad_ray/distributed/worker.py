"""A replay worker: one step range of a cache plus the training data, advancing batch states.

The worker has no Ray in it: the serial backend uses it directly and the Ray shard actor
wraps it. It is built from URIs (never object references), so a restarted actor rebuilds
itself from storage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.batched import BatchedReplay, BatchedResult, BatchedState
from ..core.data import ChangeSet
from ..core.replay import DeltaGradConfig
from ..store.cache import open_cache


class ReplayWorker:
    """Holds steps [start, stop) of a cache in memory and replays batches over them.

    Args:
      cache_uri: the trajectory cache.
      data_uri: its training data (default: the location recorded in the cache).
      steps: (start, stop) step range owned; default all steps (replicated mode).
      threads: torch threads (results are bit-identical only at equal thread counts).
      device: torch device for the replay.
    """

    def __init__(self, cache_uri, data_uri: str | None = None, steps: tuple[int, int] | None = None,
                 threads: int | None = None, device: str = "cpu", data=None,
                 data_shards: list[str] | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        # an already open Cache and its Dataset may be passed in-process (serial backend)
        self.cache = cache_uri if hasattr(cache_uri, "manifest") else open_cache(cache_uri)
        self.rows = None
        if data_shards:  # data-parallel: the features live on DataShard actors, found by name
            import ray

            from ..store.cache import labels_only
            from .datashard import RemoteRows
            self.data = labels_only(self.cache, data_uri)
            actors = [ray.get_actor(name) for name in data_shards]
            ranges = ray.get([a.info.remote() for a in actors])
            self.rows = RemoteRows([(a, *r["range"]) for a, r in zip(actors, ranges)], self.cache.plan.n_base)
        else:
            self.data = data if data is not None else self.cache.data(data_uri, device=device)
        self.traj = self.cache.trajectory(device)
        self.range = steps or (0, self.traj.steps)
        self.segments = list(self.traj.segments(*self.range))
        self.device = device

    def info(self) -> dict:
        import os
        import socket
        held = sum(s.params.element_size() * (s.params.numel() + s.grads.numel()) for s in self.segments)
        data_bytes = self.data.X.element_size() * self.data.X.numel()
        return {"range": list(self.range), "bytes": held, "data_bytes": data_bytes, "pid": os.getpid(),
                "host": socket.gethostname(), "threads": torch.get_num_threads()}

    def _replay(self, changes: Sequence[ChangeSet], config: DeltaGradConfig, gemm_dtype) -> BatchedReplay:
        changes = [ChangeSet(c.delete.to(self.device), None if c.add is None else c.add.to(device=self.device))
                   for c in changes]
        return BatchedReplay(self.cache.model, self.traj, self.data, changes, config, gemm_dtype=gemm_dtype,
                             rows=self.rows)

    def advance(self, changes: Sequence[ChangeSet], config: DeltaGradConfig, gemm_dtype,
                state: BatchedState | None) -> BatchedState:
        """Run a batch over this worker's steps, from ``state`` (None: the start of the trajectory)."""
        rp = self._replay(changes, config, gemm_dtype)
        if state is None:
            state = rp.start()
        if state.step != self.range[0]:
            raise ValueError(f"the batch is at step {state.step}, this worker starts at step {self.range[0]}")
        for seg in self.segments:
            state = rp.run_segment(state, seg)
        return state

    def replay(self, changes: Sequence[ChangeSet], config: DeltaGradConfig, gemm_dtype) -> BatchedResult:
        """The whole replay of a batch (replicated mode: this worker holds every step)."""
        if self.range != (0, self.traj.steps):
            raise ValueError("replay() needs a worker that holds every step")
        state = self.advance(changes, config, gemm_dtype, None)
        return result_of(state, self.traj.steps)


def result_of(state: BatchedState, steps: int) -> BatchedResult:
    return BatchedResult(state.W, steps, state.explicit_steps, state.approx_steps, state.fallbacks,
                         state.skipped_pairs)


def slice_state(state: BatchedState, idx: torch.Tensor) -> BatchedState:
    """The state of a subset of a batch's requests (requests are independent rows)."""
    h = state.history
    hist = type(h)(*(getattr(h, f)[idx] for f in h._fields))  # every field is per request
    return BatchedState(state.W[idx], hist, state.step, state.synced[idx], state.curvature[idx],
                        state.explicit_steps[idx], state.approx_steps[idx], state.fallbacks[idx],
                        state.skipped_pairs[idx])
