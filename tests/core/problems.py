"""Small training problems shared by the core tests (cached: each trains once per session)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from deltagrad_ray.core import (Dataset, FunctionalModel, ModelSpec, Trajectory, learning_rates,
                                synthetic_classification, synthetic_regression, train)


class Problem(NamedTuple):
    model: FunctionalModel
    data: Dataset
    traj: Trajectory
    n_classes: int | None
    extra: Dataset  # rows with new ids, for additions


# n=8000, d=10: SGD batches of 1000 (8 per epoch). DeltaGrad's SGD error grows like
# sqrt(d/|B|)·sqrt(η): with |B| ≪ d or a large η the mini-batch Hessians differ too much
# from step to step for any quasi-Newton model (README, "Accuracy").
N, D, C = 8000, 10, 4


@functools.cache
def problem(kind: str, optimizer: str, dtype: torch.dtype = torch.float64) -> Problem:
    if kind == "linear":
        data, extra, spec, c = (synthetic_regression(N, D, seed=1, dtype=dtype),
                                synthetic_regression(40, D, seed=2, dtype=dtype),
                                ModelSpec("linear", D), None)
    else:
        data = synthetic_classification(N, D, C, seed=1, dtype=dtype)
        extra = synthetic_classification(40, D, C, seed=2, dtype=dtype)
        spec, c = ModelSpec(kind, D, C, (16,) if kind == "mlp" else ()), C
    extra = Dataset(extra.X, extra.y, extra.ids + 10 * N)
    model = spec.build()
    if optimizer == "gd":
        steps, lr, bs = 150, (0.1 if kind == "mlp" else 0.5), None
    elif kind == "mlp":
        steps, lr, bs = 150, 0.05, 2000
    else:
        steps, lr, bs = 120, 0.05, 1000
    traj = train(model, data, steps=steps, lrs=learning_rates(steps, lr), l2=0.01, batch_size=bs, seed=3)
    return Problem(model, data, traj, c, extra)


def random_ids(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
