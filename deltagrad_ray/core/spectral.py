"""Largest eigenvalues by power iteration: the curvature behind automatic learning rates.

Gradient descent on an L-smooth objective is stable for η < 2/L (Nesterov 2004, Thm. 2.1.14), so a
learning rate can be chosen from L, the largest eigenvalue of the Hessian. Both estimates here run
the power method for a symmetric matrix A (Golub & Van Loan 2013, Sec. 8.2.1): v ← A·v/‖A·v‖, whose
‖A·v‖ rises to |λ|max(A) at a rate (|λ_2|/|λ_1|)^k. A is only ever applied to vectors, so neither
the Hessian nor the Gram matrix is formed. The start and the stopping rule are fixed, so the same
input gives the same answer bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, vjp

from .models import FunctionalModel


def power_iteration(apply: Callable[[Tensor], Tensor], v: Tensor, iters: int, rtol: float) -> float:
    """|λ|max of the symmetric matrix behind ``apply`` (v ↦ A·v), from the unit vector ``v``.

    Stops after ``iters`` products, or at the first ‖A·v‖ within ``rtol`` (relative) of the one
    before. Returns 0 for A·v = 0, and the first non-finite ‖A·v‖ as it is (the caller decides what
    an overflowing matrix means).
    """
    lam = 0.0
    for _ in range(iters):
        w = apply(v)
        new = float(w.norm())
        if new == 0 or not math.isfinite(new):
            return new
        v = w / new
        if abs(new - lam) <= rtol * new:
            return new
        lam = new
    return lam


def hessian_norm(fm: FunctionalModel, theta: Tensor, X: Tensor, y: Tensor, l2: float, iters: int = 30) -> float:
    """|λ|max of ∇²F(θ) for F(θ) = Σ_i ℓ(θ; x_i, y_i)/n + (λ/2)‖θ‖² on the rows (X, y).

    Hessian-vector products by reverse over reverse (Pearlmutter 1994): one vjp of ∇F at θ, after
    which H·v is that vjp applied to v, as H is symmetric. The start is a normal vector drawn from
    seed 0 (in float64, then cast, so every dtype starts from the same direction); the iteration
    stops at a relative change of 1e-3, enough for a learning rate.
    """
    _, hvp = vjp(grad(lambda th: fm.loss_sum(th, X, y) / len(X) + 0.5 * l2 * (th @ th)), theta)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(theta.shape, generator=gen, dtype=torch.float64).to(dtype=theta.dtype, device=theta.device)
    return power_iteration(lambda u: hvp(u)[0], v / v.norm(), iters, 1e-3)


def gram_norm(X: Tensor, iters: int = 100) -> float:
    """λmax(XᵀX) = σ_max(X)², the squared spectral norm of the (n, k) matrix ``X``.

    Each product is Xᵀ(X·v), O(nk), never the k × k Gram matrix. The start is the unit vector
    1/√k, and the iteration stops at a relative change of 1e-6.
    """
    v = torch.ones(X.shape[1], dtype=X.dtype, device=X.device) / math.sqrt(X.shape[1])
    return power_iteration(lambda u: X.T @ (X @ u), v, iters, 1e-6)
