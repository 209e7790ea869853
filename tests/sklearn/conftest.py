"""Shared data for the scikit-learn face: scikit-learn's bundled data sets, standardised."""

import numpy as np
import pytest


def standardized(loader, seed=0):
    X, y = loader(return_X_y=True)
    perm = np.random.RandomState(seed).permutation(len(X))
    X, y = X[perm], y[perm]
    return (X - X.mean(0)) / X.std(0), y


@pytest.fixture(scope="session")
def diabetes():
    from sklearn.datasets import load_diabetes
    return standardized(load_diabetes)


@pytest.fixture(scope="session")
def breast_cancer():
    from sklearn.datasets import load_breast_cancer
    return standardized(load_breast_cancer)


@pytest.fixture(scope="session")
def wine():
    from sklearn.datasets import load_wine
    return standardized(load_wine)
