"""Tables of replayed models (leave-one-out or fold models), read a chunk of rows at a time.

The statistics take their models through :class:`ModelTable`, so that n models of p parameters
need not be in memory at once (n × p float64 is 3.8 GB for leave-one-out on MNIST). Two
implementations: :class:`TensorTable` over an (n, p) tensor, and
:class:`~deltagrad_ray.store.parts.SinkTable` over a fan-out's result parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..core.errors import InputError


@runtime_checkable
class ModelTable(Protocol):
    """n parameter vectors θ_0 … θ_{n−1} of length p, in request order."""

    def __len__(self) -> int:
        """n, the number of models."""

    @property
    def p(self) -> int:
        """Parameters per model."""

    def chunks(self, size: int) -> Iterator[tuple[int, Tensor]]:
        """``(start, θ[start:start + k])`` for start = 0, size, 2·size, …; k = size except at the end."""

    def rows(self, idx: Tensor) -> Tensor:
        """θ[idx], shape (len(idx), p)."""


def check_chunk(size: int) -> int:
    """A chunk size: an integer >= 1."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"chunk size must be an integer >= 1, got {size!r}")
    return size


class TensorTable:
    """A :class:`ModelTable` over an in-memory (n, p) tensor (chunks are views, not copies).

    Example:
      >>> t = TensorTable(torch.arange(6.0).reshape(3, 2))
      >>> [(s, c.tolist()) for s, c in t.chunks(2)]
      [(0, [[0.0, 1.0], [2.0, 3.0]]), (2, [[4.0, 5.0]])]
    """

    def __init__(self, params: Tensor) -> None:
        if not isinstance(params, Tensor) or params.ndim != 2:
            raise InputError(f"models must be an (n, p) tensor, got {getattr(params, 'shape', type(params))!r}")
        self.params = params

    def __len__(self) -> int:
        return self.params.shape[0]

    @property
    def p(self) -> int:
        return self.params.shape[1]

    def chunks(self, size: int) -> Iterator[tuple[int, Tensor]]:
        check_chunk(size)
        for start in range(0, len(self), size):
            yield start, self.params[start:start + size]

    def rows(self, idx: Tensor) -> Tensor:
        return self.params[torch.as_tensor(idx, dtype=torch.int64)]


def as_table(models: ModelTable | Tensor) -> ModelTable:
    """``models`` itself if it is a :class:`ModelTable`, else a :class:`TensorTable` over it."""
    if isinstance(models, Tensor):
        return TensorTable(models)
    if not isinstance(models, ModelTable):
        raise InputError(f"models must be an (n, p) tensor or a ModelTable, got {type(models).__name__}")
    return models
