"""Jackknife estimates from leave-one-out models, and leave-one-out influence."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..core.errors import InputError


class Jackknife(NamedTuple):
    """Jackknife summary of a statistic (any shape).

    Fields:
      estimate:       θ̂, the statistic of the full-data model
      bias:           (n − 1)(θ̄ − θ̂), θ̄ the mean of the leave-one-out statistics
      bias_corrected: θ̂ − bias = nθ̂ − (n − 1)θ̄
      se:             √((n − 1)/n · Σ_i (θ_(i) − θ̄)²)
    """

    estimate: Tensor
    bias: Tensor
    bias_corrected: Tensor
    se: Tensor


def jackknife(full: Tensor, loo: Tensor) -> Jackknife:
    """Quenouille's bias correction and Tukey's standard error (Efron & Stein 1981).

    Args:
      full: the statistic on all n points, shape S.
      loo:  the statistic with point i left out, shape (n, *S).

    Example:
      >>> x = torch.tensor([1.0, 2.0, 4.0, 7.0])
      >>> loo = torch.stack([torch.cat([x[:i], x[i + 1:]]).mean() for i in range(4)])
      >>> jk = jackknife(x.mean(), loo)   # se equals s/√n for the mean
      >>> bool(torch.isclose(jk.se, x.std() / 2))
      True
    """
    if loo.ndim < 1 or loo.shape[0] < 2:
        raise InputError(f"the jackknife needs at least 2 leave-one-out values, got shape {tuple(loo.shape)}")
    if loo.shape[1:] != full.shape:
        raise InputError(f"leave-one-out statistics have shape {tuple(loo.shape[1:])}, the full one "
                         f"{tuple(full.shape)}")
    mean = loo.mean(0)
    return from_moments(full, loo.shape[0], mean, ((loo - mean) ** 2).sum(0))


def from_moments(full: Tensor, n: int, mean: Tensor, m2: Tensor) -> Jackknife:
    """The jackknife summary from the n leave-one-out statistics' mean θ̄ and Σ_i (θ_(i) − θ̄)²."""
    bias = (n - 1) * (mean - full)
    se = torch.sqrt((n - 1) / n * m2)
    return Jackknife(full, bias, full - bias, se)


def loo_influence(full_test_loss: Tensor, loo_test_loss: Tensor) -> Tensor:
    """Leave-one-out influence of each training point on the test loss: L(θ_(i)) − L(θ̂).

    Positive: removing the point raises the test loss (the point helps); negative: it hurts.
    """
    return loo_test_loss - full_test_loss
