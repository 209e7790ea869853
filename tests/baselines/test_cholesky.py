"""Rank-r Cholesky updates and downdates against factoring the changed matrix from scratch."""

import pytest
import torch

from deltagrad_ray.baselines.cholesky import (_product_form, _sweep, cholesky_update,
                                              cholesky_update_rank1)
from deltagrad_ray.core import InputError

Q = 12


def _spd(seed: int, q: int = Q) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(5 * q, q, generator=g, dtype=torch.float64)
    return B, B.T @ B + torch.eye(q, dtype=torch.float64)


@pytest.mark.parametrize("algorithm", [_product_form, _sweep, cholesky_update_rank1, "dispatch"])
@pytest.mark.parametrize("r", [1, 3, 40])
@pytest.mark.parametrize("downdate", [False, True])
def test_matches_factoring_the_changed_matrix(algorithm, r, downdate):
    B, A = _spd(r)
    L = torch.linalg.cholesky(A)
    # downdates remove rows that are part of A (so A − VᵀV stays positive definite)
    V = B[:r] if downdate else torch.randn(r, Q, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    target = torch.linalg.cholesky(A - V.T @ V if downdate else A + V.T @ V)
    if algorithm == "dispatch":
        got = cholesky_update(L, V, downdate=downdate)
    elif algorithm is cholesky_update_rank1:
        got = L
        for v in V:
            got = cholesky_update_rank1(got, v, downdate=downdate)
    else:
        got = algorithm(L, V, downdate)
    # both are factors of the same matrix: equal to round-off (entries are O(10))
    assert float((got - target).abs().max()) < 1e-12 * float(target.abs().max()) * Q
    assert torch.equal(got, torch.tril(got)) and bool((torch.diagonal(got) > 0).all())


def test_input_factor_is_not_modified_and_zero_rows_is_a_copy():
    _, A = _spd(0)
    L = torch.linalg.cholesky(A)
    keep = L.clone()
    cholesky_update(L, torch.ones(2, Q, dtype=torch.float64), downdate=False)
    assert torch.equal(L, keep)
    out = cholesky_update(L, torch.zeros(0, Q, dtype=torch.float64))
    assert torch.equal(out, L) and out is not L


def test_update_then_downdate_returns_the_factor():
    _, A = _spd(1)
    L = torch.linalg.cholesky(A)
    V = torch.randn(5, Q, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    back = cholesky_update(cholesky_update(L, V), V, downdate=True)
    assert torch.allclose(back, L, atol=1e-12, rtol=0)


@pytest.mark.parametrize("algorithm", [_product_form, _sweep, cholesky_update_rank1])
def test_indefinite_downdate_is_refused(algorithm):
    L = torch.eye(3, dtype=torch.float64)
    v = torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64)   # I − vvᵀ has eigenvalue −3
    with pytest.raises(InputError, match="downdate would make the matrix indefinite"):
        algorithm(L, v[0], downdate=True) if algorithm is cholesky_update_rank1 else algorithm(L, v, True)


def test_bad_shapes():
    L = torch.eye(3, dtype=torch.float64)
    with pytest.raises(InputError, match=r"update rows must have 3 columns, got shape \(2, 4\)"):
        cholesky_update(L, torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(InputError, match="the factor must be a square matrix"):
        cholesky_update(torch.ones(2, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    with pytest.raises(InputError, match="positive diagonal"):
        cholesky_update(-L, torch.ones(1, 3, dtype=torch.float64))
