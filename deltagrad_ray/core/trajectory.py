"""A recorded optimisation path: what training caches and DeltaGrad replays.

Per step t the cache holds θ_t (the parameters the step started from), g_t (the gradient it
used) and η_t (Wu et al. 2020, Sec. 3: "we cache w_t and ∇F(w_t)"). The batch of each step is
not stored: it is recomputed from the :class:`~.schedule.BatchPlan` (a seed), so the cache costs
2·p floats per step.

A :class:`Trajectory` separates the small header (plan, learning rates, θ_0, θ_T, which rows
were removed) from the per-step vectors, which a *source* yields as consecutive
:class:`Segment` s. Sources never hand out tensors a caller may write to: replays treat them
as read-only, so many requests can share one cache (docs/pitfalls.md, rule 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol
from collections.abc import Iterator

import torch
from torch import Tensor

from .schedule import BatchPlan


class Segment(NamedTuple):
    """Consecutive steps [start, start + k) of a trajectory.

    Fields:
      start:  first step
      params: (k, p) θ_t at the start of each step
      grads:  (k, p) gradient used by each step
      lrs:    (k,) float64 learning rates
    """

    start: int
    params: Tensor
    grads: Tensor
    lrs: Tensor

    @property
    def stop(self) -> int:
        return self.start + int(self.params.shape[0])


class SegmentSource(Protocol):
    """Anything that yields a trajectory's steps in order, in segments."""

    def segments(self, start: int, stop: int) -> Iterator[Segment]: ...


@dataclass(frozen=True, eq=False)
class InMemory:
    """Per-step vectors held as two (T, p) tensors; yields segments of ``chunk`` steps."""

    params: Tensor
    grads: Tensor
    lrs: Tensor
    chunk: int | None = None

    def segments(self, start: int, stop: int) -> Iterator[Segment]:
        step = self.chunk or max(stop - start, 1)
        for a in range(start, stop, step):
            b = min(a + step, stop)
            yield Segment(a, self.params[a:b], self.grads[a:b], self.lrs[a:b])


@dataclass(frozen=True, eq=False)
class Trajectory:
    """A training run as DeltaGrad sees it.

    Fields:
      plan:    how batches were formed (seed, batch size, n_base)
      l2:      λ of the objective
      lrs:     (T,) float64 learning rates
      initial: (p,) θ_0
      final:   (p,) θ_T
      n_rows:  rows of the data the run saw, including rows added by earlier changes
      removed: (n_rows,) bool, rows deleted by earlier changes; None when none
      source:  the per-step vectors
    """

    plan: BatchPlan
    l2: float
    lrs: Tensor
    initial: Tensor
    final: Tensor
    n_rows: int
    removed: Tensor | None
    source: SegmentSource

    @property
    def steps(self) -> int:
        return int(self.lrs.shape[0])

    @property
    def p(self) -> int:
        return int(self.initial.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.initial.dtype

    def segments(self, start: int = 0, stop: int | None = None) -> Iterator[Segment]:
        return self.source.segments(start, self.steps if stop is None else stop)

    def materialize(self) -> InMemory:
        """All per-step vectors in memory (small trajectories and tests)."""
        segs = list(self.segments())
        return InMemory(torch.cat([s.params for s in segs]), torch.cat([s.grads for s in segs]),
                        self.lrs)


class MemoryRecorder:
    """Receives (θ_t, g_t) during training or a recorded replay and keeps them in memory."""

    def __init__(self, steps: int, p: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.params = torch.empty(steps, p, dtype=dtype, device=device)
        self.grads = torch.empty(steps, p, dtype=dtype, device=device)

    def record(self, step: int, theta: Tensor, grad: Tensor) -> None:
        self.params[step] = theta
        self.grads[step] = grad

    def finish(self, lrs: Tensor) -> SegmentSource:
        return InMemory(self.params, self.grads, lrs)
