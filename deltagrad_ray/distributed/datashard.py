"""Data-parallel rows: the training data split across actors when it is too big for one.

Each :class:`DataShard` actor holds a contiguous range of rows [a, b) (loaded, and checked
against the cache's fingerprint, by the actor itself from the data location) and answers for
them: the features of some rows, and its part of an explicit step's Σ ∇ℓ_i(w_b) for B parameter
vectors. :class:`RemoteRows` is the row provider a replay worker uses instead of holding the
data: it splits each question by range and sums the shards' answers. Explicit steps then cost
one round trip to every shard, and the shards compute in parallel. Tensors cross between the
actors on the CPU; each side moves them to its own device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.replay import LocalRows
from ..store.cache import open_cache


class DataShard:
    """Rows [a, b) of a cache's training data (an actor in the Ray backend's data-parallel mode)."""

    def __init__(self, cache_uri: str, data_uri: str | None, rows: tuple[int, int], threads: int | None = None,
                 device: str = "cpu") -> None:
        if threads:
            torch.set_num_threads(threads)
        cache = open_cache(cache_uri)
        a, b = rows
        self.range = (a, b)
        self.device = device
        self.n_base_local = max(0, min(b, cache.plan.n_base) - a)
        # only rows [a, b) are held; all are read once, to verify the data's fingerprint
        self.rows = LocalRows(cache.model, cache.data_rows(a, b, data_uri, device), self.n_base_local)

    def info(self) -> dict:
        d = self.rows.data
        return {"range": list(self.range), "bytes": d.X.element_size() * d.X.numel()}

    def features(self, local_rows: Tensor) -> Tensor:
        return self.rows.features(local_rows.to(self.device)).cpu()

    def grad_many(self, W: Tensor, base: Tensor | None, weights: Tensor | None, extra: Tensor, w_t: Tensor) -> Tensor:
        """This shard's part of Σ ∇ℓ_i(w_b): rows given as local indices (None: all its base rows)."""
        dev = self.device
        moved = [None if x is None else x.to(dev) for x in (W, base, weights, extra, w_t)]
        return self.rows.grad_many(*moved).cpu()


class RemoteRows:
    """A row provider over :class:`DataShard` actors (see :class:`~deltagrad_ray.core.replay.LocalRows`).

    Args:
      shards: (actor handle, start, stop) of every shard, covering all rows.
      n_base: rows placed by the batch plan's permutation.
      device: the replay's device (answers arrive on the CPU and are moved there).
      width, dtype: the features' width and dtype (to answer for no rows).
    """

    def __init__(self, shards: list[tuple[object, int, int]], n_base: int, device: str = "cpu", *,
                 width: int, dtype: torch.dtype) -> None:
        self.shards, self.n_base, self.device = shards, n_base, device
        self.width, self.dtype = width, dtype

    def features(self, rows: Tensor) -> Tensor:
        import ray
        parts, where = [], []
        for actor, a, b in self.shards:
            m = (rows >= a) & (rows < b)
            if bool(m.any()):
                parts.append(actor.features.remote((rows[m] - a).cpu()))
                where.append(m)
        got = ray.get(parts)
        out = torch.empty(len(rows), self.width, dtype=self.dtype)
        for m, x in zip(where, got):
            out[m.cpu()] = x
        return out.to(self.device)

    def grad_many(self, W: Tensor, base: Tensor | None, weights: Tensor | None, extra: Tensor,
                  w_t: Tensor) -> Tensor:
        import ray
        refs = []
        for actor, a, b in self.shards:
            if base is None:  # every base row: each shard its own, with its slice of the weights
                bl = None
                wl = weights[a:min(b, self.n_base)] if weights is not None and a < self.n_base else None
            else:
                m = (base >= a) & (base < b)
                bl, wl = base[m] - a, (weights[m] if weights is not None else None)
            el = extra[(extra >= a) & (extra < b)] - a
            refs.append(actor.grad_many.remote(*(None if x is None else x.cpu() for x in (W, bl, wl, el, w_t))))
        return sum(ray.get(refs)).to(self.device)
