"""Synthetic data sets of the paper's shapes (nothing can be downloaded at run time)."""

from __future__ import annotations

import math

import torch

from .data import Dataset
from .errors import InputError


def _check(n: int, d: int) -> None:
    if n < 1 or d < 1:
        raise InputError(f"synthetic data needs n >= 1 and d >= 1, got n={n}, d={d}")


def synthetic_classification(n: int, d: int, n_classes: int, *, seed: int = 0, separation: float = 1.0,
                             dtype: torch.dtype = torch.float64) -> Dataset:
    """A Gaussian mixture shaped like MNIST when n=60,000, d=784, c=10.

    Class means are random directions of norm ``separation``·√(log c)·2; features have unit
    noise, scaled by 1/√d so that ‖x‖ ≈ 1 as for normalised images. Ids are 0..n-1.
    """
    _check(n, d)
    if n_classes < 2:
        raise InputError(f"n_classes must be >= 2, got {n_classes}")
    g = torch.Generator().manual_seed(int(seed))
    means = torch.randn(n_classes, d, generator=g)
    means *= separation * 2 * math.sqrt(math.log(n_classes)) / means.norm(dim=1, keepdim=True)
    y = torch.randint(0, n_classes, (n,), generator=g)
    X = (torch.randn(n, d, generator=g) + means[y]) / math.sqrt(d) * 3
    return Dataset(X.to(dtype), y, torch.arange(n, dtype=torch.int64))


def synthetic_regression(n: int, d: int, *, seed: int = 0, noise: float = 0.5,
                         dtype: torch.dtype = torch.float64) -> Dataset:
    """y = x·w* + 1 + noise·ε with x ~ N(0, I/d·9) and ‖w*‖ = 3. Ids are 0..n-1."""
    _check(n, d)
    g = torch.Generator().manual_seed(int(seed))
    w = torch.randn(d, generator=g)
    w *= 3 / w.norm()
    X = torch.randn(n, d, generator=g) / math.sqrt(d) * 3
    y = X @ w + 1 + noise * torch.randn(n, generator=g)
    return Dataset(X.to(dtype), y.to(dtype), torch.arange(n, dtype=torch.int64))
