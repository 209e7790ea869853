"""The power iterations behind lr="auto" against eigenvalues of the explicit matrices."""

import pytest
import torch
from torch.autograd.functional import hessian

from deltagrad_ray.core import ModelSpec, gram_norm, hessian_norm, synthetic_classification, synthetic_regression


@pytest.mark.parametrize("kind", ["logreg", "mlp", "linear"])
def test_hessian_norm_is_the_largest_eigenvalue_in_magnitude(kind):
    d, c, l2 = 5, 3, 0.1
    data = (synthetic_regression(40, d, seed=0) if kind == "linear"
            else synthetic_classification(40, d, c, seed=0))
    fm = ModelSpec(kind, d, 1 if kind == "linear" else c, (6,) if kind == "mlp" else ()).build()
    theta = 0.5 * torch.randn(fm.p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # the explicit Hessian by double backward (torch.autograd, not the torch.func vjp under test)
    H = hessian(lambda th: fm.loss_sum(th, data.X, data.y) / len(data) + 0.5 * l2 * (th @ th), theta)
    exact = float(torch.linalg.eigvalsh(H).abs().max())
    # the iteration stops at a relative change of 1e-3: within 1% of the eigenvalue here, while
    # dropping the l2 term, the 1/n or the square root of a norm would each miss by more
    assert hessian_norm(fm, theta, data.X, data.y, l2, iters=200) == pytest.approx(exact, rel=1e-2)


def test_hessian_norm_is_deterministic_and_its_start_does_not_depend_on_the_dtype():
    data = synthetic_classification(40, 5, 3, seed=0)
    fm = ModelSpec("mlp", 5, 3, (6,)).build()
    theta = fm.init_params(0)
    a = hessian_norm(fm, theta, data.X, data.y, 1e-3)
    assert a == hessian_norm(fm, theta, data.X, data.y, 1e-3)
    b = hessian_norm(fm, theta.float(), data.X.float(), data.y, 1e-3)
    assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_norm_is_the_squared_spectral_norm(dtype):
    X = torch.randn(60, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    X = torch.cat([X, torch.ones(60, 1, dtype=torch.float64)], dim=1).to(dtype)  # as lr="auto" builds it
    exact = float(torch.linalg.matrix_norm(X.double(), 2) ** 2)
    assert gram_norm(X) == pytest.approx(exact, rel=1e-5 if dtype == torch.float64 else 1e-4)


def test_gram_norm_of_a_zero_matrix_is_zero():
    assert gram_norm(torch.zeros(4, 3, dtype=torch.float64)) == 0.0
