"""Small problems shared by the baseline tests (cached: each trains once per session)."""

from __future__ import annotations

import functools

import torch

from deltagrad_ray.baselines import TrainConfig
from deltagrad_ray.core import Dataset, ModelSpec, synthetic_classification, synthetic_regression

N, D, C = 2000, 8, 3


def random_ids(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


@functools.cache
def classification() -> tuple[Dataset, Dataset]:
    """(training rows, rows with new ids for additions)."""
    data = synthetic_classification(N, D, C, seed=1)
    extra = synthetic_classification(40, D, C, seed=2)
    return data, Dataset(extra.X, extra.y, extra.ids + 10 * N)


@functools.cache
def regression() -> tuple[Dataset, Dataset]:
    data = synthetic_regression(N, D, seed=1)
    extra = synthetic_regression(40, D, seed=2)
    return data, Dataset(extra.X, extra.y, extra.ids + 10 * N)


# GD to convergence: ‖∇F(θ_T)‖ < 1e-9 on both problems (checked in test_gradient), so exact
# retraining is the optimum of the changed objective to the same precision.
LOGREG = TrainConfig(ModelSpec("logreg", D, C), steps=400, lr=2.0, l2=0.05, seed=3)
LINEAR = TrainConfig(ModelSpec("linear", D), steps=300, lr=0.5, l2=0.05, seed=3)
# A short run (not converged), as DeltaGrad is usually used
LOGREG_SHORT = TrainConfig(ModelSpec("logreg", D, C), steps=100, lr=0.5, l2=0.01, seed=3)
