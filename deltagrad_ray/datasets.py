"""Data sets that need no download: synthetic ones of the paper's shapes, and scikit-learn's bundled ones."""

from __future__ import annotations

import torch

from .core.data import Dataset
from .core.errors import InputError
from .core.synthetic import synthetic_classification, synthetic_regression

SKLEARN = {"digits": "load_digits", "breast_cancer": "load_breast_cancer", "diabetes": "load_diabetes",
           "wine": "load_wine", "iris": "load_iris"}
REGRESSION = {"diabetes"}


def sklearn_dataset(name: str, *, standardize: bool = True, dtype: torch.dtype = torch.float64) -> Dataset:
    """A data set shipped inside scikit-learn, features standardised (mean 0, sd 1), ids 0..n-1."""
    if name not in SKLEARN:
        raise InputError(f"unknown scikit-learn data set {name!r}; expected one of {', '.join(SKLEARN)}")
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, SKLEARN[name])()
    X = torch.tensor(bunch.data, dtype=torch.float64)
    if standardize:
        sd = X.std(dim=0)
        X = (X - X.mean(dim=0)) / torch.where(sd > 0, sd, torch.ones_like(sd))
    y = torch.tensor(bunch.target)
    y = y.to(dtype) if name in REGRESSION else y.to(torch.int64)
    return Dataset(X.to(dtype), y, torch.arange(len(y), dtype=torch.int64))


def train_test_split(data: Dataset, n_train: int, *, n_test: int | None = None,
                     seed: int = 0) -> tuple[Dataset, Dataset]:
    """A seeded random split: ``n_train`` rows, then ``n_test`` of the rest (default: all of them)."""
    if not 0 < n_train < len(data):
        raise InputError(f"n_train must be in [1, {len(data) - 1}] (the data has {len(data)} rows), got {n_train!r}")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    rest = perm[n_train:] if n_test is None else perm[n_train:n_train + n_test]
    return data.rows(perm[:n_train]), data.rows(rest)


def make_dataset(kind: str, *, n: int = 10_000, d: int = 20, n_classes: int = 10, seed: int = 0,
                 dtype: str | torch.dtype = "float64") -> Dataset:
    """``classification`` / ``regression`` (synthetic, n × d) or a scikit-learn name."""
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if kind == "classification":
        return synthetic_classification(n, d, n_classes, seed=seed, dtype=dt)
    if kind == "regression":
        return synthetic_regression(n, d, seed=seed, dtype=dt)
    return sklearn_dataset(kind, dtype=dt)
