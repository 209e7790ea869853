"""Models as functions of θ: closed-form gradients equal autograd through functional_call."""

import pytest
import torch

from deltagrad_ray.core import ModelSpec, synthetic_classification, synthetic_regression


@pytest.mark.parametrize("kind", ["logreg", "linear"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_closed_form_gradient_equals_autograd(kind, dtype, weighted):
    d = 7
    data = (synthetic_classification(50, d, 3, seed=0, dtype=dtype) if kind == "logreg"
            else synthetic_regression(50, d, seed=0, dtype=dtype))
    m = ModelSpec(kind, d, 3 if kind == "logreg" else 1).build()
    theta = torch.randn(m.p, generator=torch.Generator().manual_seed(1)).to(dtype)
    w = (torch.rand(50, generator=torch.Generator().manual_seed(2)) > 0.3).to(dtype) if weighted else None
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(m.grad_sum(theta, data.X, data.y, w), m.autograd_grad_sum(theta, data.X, data.y, w),
                          rtol=tol, atol=tol)


def test_parameter_layout_matches_the_module():
    m = ModelSpec("logreg", 4, 3).build()
    theta = torch.arange(m.p, dtype=torch.float64)
    params = m.unflatten(theta)
    assert list(params) == ["weight", "bias"] and params["weight"].shape == (3, 4)
    assert torch.equal(m.flatten(params), theta)


def test_linear_models_start_at_zero_and_mlp_from_a_seeded_init():
    assert torch.count_nonzero(ModelSpec("linear", 5).build().init_params(0)) == 0
    mlp = ModelSpec("mlp", 5, 3, (8,)).build()
    a, b = mlp.init_params(1), mlp.init_params(1)
    assert torch.equal(a, b) and not torch.equal(a, mlp.init_params(2))
    assert torch.equal(mlp.init_params(1, dtype=torch.float32), a.float())


def test_mlp_gradient_and_evaluation():
    data = synthetic_classification(30, 5, 3, seed=0)
    mlp = ModelSpec("mlp", 5, 3, (8, 4)).build()
    theta = mlp.init_params(0)
    assert mlp.grad_sum(theta, data.X, data.y).shape == (mlp.p,)
    ev = mlp.evaluate(theta, data.X, data.y)
    assert set(ev) == {"loss", "accuracy"} and 0 <= ev["accuracy"] <= 1
