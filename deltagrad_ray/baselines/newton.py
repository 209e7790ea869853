"""One Newton step on the changed objective: influence-function removal for convex models.

For the objective F(θ) = (1/n)Σ_i ℓ_i(θ) + (λ/2)‖θ‖² trained to θ_T, the model after a change
(rows R deleted, rows A added, n' = n − |R| + |A|) is approximated by one Newton step on the
changed objective F' from θ_T:

    θ' = θ_T − H'⁻¹·∇F'(θ_T),   ∇F'(θ_T) = (G − Σ_R ∇ℓ_i + Σ_A ∇ℓ_i)/n' + λθ_T,
                                H' = (H − Σ_R ∇²ℓ_i + Σ_A ∇²ℓ_i)/n' + λI,

where G = Σ_i ∇ℓ_i(θ_T) and H = Σ_i ∇²ℓ_i(θ_T) over the fitted rows are computed once, at fit
time (an O(n·p²) pass), and every request touches only its own rows: O((r + a)·p²) to update
the sums and one p × p Cholesky solve (never an inverse). When θ_T is the optimum, G = −nλθ_T
and ∇F'(θ_T) = (Σ_A ∇ℓ_i − Σ_R ∇ℓ_i + (a − r)λθ_T)/n': the influence-function update of Koh &
Liang (2017) and the Newton removal step of Guo et al. (2019, eq. 3) for a set of points.
Keeping G makes the step exact even when training stopped short of the optimum.

For a quadratic loss (the ``linear`` model) one step lands exactly on the optimum of F'; for
logistic regression the error is second order in the change. Sequential requests all step from
the same anchor θ_T with the accumulated change, so applying requests one by one equals applying
their union at once. The method needs the Hessian, so it is refused for non-convex models.

The method's own exact reference is the minimiser of F' itself, found by Newton's method run
to convergence (:func:`minimize`); the step above is that method's first iterate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.data import ChangeSet, Dataset
from ..core.errors import InputError
from ..core.models import FunctionalModel
from .base import Outcome, Rows, TrainConfig, request
from .gradient import Trained, fit_trained

CONVEX = ("logreg", "linear")
CHUNK = 4096  # rows per block when summing Hessians (bounds memory at CHUNK·p floats)


def check_convex(model: FunctionalModel) -> None:
    """Raise :class:`InputError` unless ``model`` is one of the convex built-in models."""
    kind = model.spec.kind if model.spec is not None else "a custom module"
    if kind not in CONVEX:
        raise InputError(f"the Newton step needs a convex model (logreg or linear) with a known Hessian, got {kind}")


def hessian_sum(model: FunctionalModel, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """Σ_i ∇²ℓ_i(θ) over the rows of X, (p, p), in closed form; no regulariser.

    * ``linear``: ∇²ℓ_i = x̃x̃ᵀ with x̃ = [x, 1] (layout θ = [w, b]).
    * ``logreg``: with π = softmax(Wx + b) and S = diag(π) − ππᵀ, ∇²ℓ_i = S ⊗ x̃x̃ᵀ in the
      layout (class, feature-or-bias); summed as Σ diag(π)⊗x̃x̃ᵀ − ZᵀZ with Z_i = π_i ⊗ x̃_i, then
      permuted to the model's layout θ = [W (c × d) row-major, b (c)].
    """
    check_convex(model)
    n, d = X.shape
    Xt = torch.cat([X, torch.ones(n, 1, dtype=X.dtype, device=X.device)], dim=1)   # (n, d+1)
    if model.spec.kind == "linear":
        return Xt.T @ Xt
    c = model.n_classes
    W, b = theta[: c * d].view(c, d), theta[c * d:]
    q = d + 1
    H = torch.zeros(c * q, c * q, dtype=X.dtype, device=X.device)
    diag_blocks = torch.zeros(c, q, q, dtype=X.dtype, device=X.device)
    for lo in range(0, n, CHUNK):
        Xc = Xt[lo: lo + CHUNK]
        P = torch.softmax(torch.addmm(b, X[lo: lo + CHUNK], W.T), dim=1)           # (m, c)
        Z = (P[:, :, None] * Xc[:, None, :]).reshape(len(Xc), c * q)                 # (m, c·q)
        H -= Z.T @ Z
        diag_blocks += torch.einsum("maj,mk->ajk", Z.view(len(Xc), c, q), Xc)
    H.view(c, q, c, q).diagonal(dim1=0, dim2=2).add_(diag_blocks.permute(1, 2, 0))
    idx = _layout(c, d, X.device)
    out = torch.empty_like(H)
    out[idx[:, None], idx[None, :]] = H
    return out


def _layout(c: int, d: int, device: torch.device) -> Tensor:
    """Model index of each (class a, column j) entry, j = d being the bias: (c·(d+1),)."""
    a = torch.arange(c, device=device)[:, None]
    j = torch.arange(d + 1, device=device)[None, :]
    return torch.where(j < d, a * d + j, c * d + a).reshape(-1)


def _solve_spd(H: Tensor, g: Tensor) -> Tensor:
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise InputError("the Hessian of the changed objective is not positive definite; "
                         "train with l2 > 0 so that the objective is strongly convex")
    return torch.cholesky_solve(g[:, None], L).reshape(-1)


def objective(model: FunctionalModel, theta: Tensor, data: Dataset, l2: float) -> float:
    """F(θ) = mean loss + (λ/2)‖θ‖² over ``data``."""
    return float(model.loss_sum(theta, data.X, data.y)) / len(data) + 0.5 * l2 * float(theta @ theta)


def minimize(model: FunctionalModel, data: Dataset, l2: float, theta0: Tensor, *, tol: float = 1e-11,
             max_iter: int = 50) -> tuple[Tensor, Tensor, Tensor]:
    """The minimiser of F on ``data`` by Newton's method with a backtracking line search.

    Args:
      model: a convex model (logreg or linear).
      data: the rows.
      l2: λ.
      theta0: starting point.
      tol: stop when ‖∇F(θ)‖ <= tol.
      max_iter: Newton iterations allowed.

    Returns:
      (θ*, G, H): the minimiser and the loss-gradient and loss-Hessian sums over ``data`` at θ*.
    """
    check_convex(model)
    n = len(data)
    theta = theta0.clone()
    eye = torch.eye(model.p, dtype=theta.dtype, device=theta.device)
    for _ in range(max_iter):
        G = model.grad_sum(theta, data.X, data.y)
        H = hessian_sum(model, theta, data.X, data.y)
        g = G / n + l2 * theta
        if float(g.norm()) <= tol:
            return theta, G, H
        step = _solve_spd(H / n + l2 * eye, g)
        t, decrement = 1.0, float(g @ step)
        f0 = objective(model, theta, data, l2)
        # Armijo backtracking while the predicted decrease is above round-off in F; near the
        # optimum the full step is taken (quadratic convergence, and F can no longer resolve it)
        if decrement > 1e-12 * max(1.0, abs(f0)):
            while t > 1e-8 and objective(model, theta - t * step, data, l2) > f0 - 1e-4 * t * decrement:
                t /= 2
        theta = theta - t * step
    raise InputError(f"Newton's method did not reach ‖∇F‖ <= {tol:g} in {max_iter} iterations; "
                     "the objective may not be strongly convex (l2 = 0?)")


class NewtonState(NamedTuple):
    """The anchor θ_T and the sums the step needs, over the current rows.

    Fields:
      model:    the convex functional model
      rows:     current rows
      anchor:   (p,) θ_T, where G and H are evaluated
      grad_sum: (p,) G = Σ ∇ℓ_i(anchor) over the active rows
      hess_sum: (p, p) H = Σ ∇²ℓ_i(anchor) over the active rows
      n:        active rows
      params:   (p,) the current model
    """

    model: FunctionalModel
    rows: Rows
    anchor: Tensor
    grad_sum: Tensor
    hess_sum: Tensor
    n: int
    params: Tensor


@dataclass(frozen=True)
class NewtonStep:
    """One Newton step / influence removal (Koh & Liang 2017; Guo et al. 2019) on a trained model.

    Args:
      train: model and optimiser settings (logreg or linear, l2 > 0 for a unique step).
    """

    train: TrainConfig

    def __post_init__(self) -> None:
        if self.train.spec.kind not in CONVEX:
            raise InputError("the Newton step needs a convex model (logreg or linear) with a known Hessian, "
                             f"got {self.train.spec.kind}")

    @property
    def name(self) -> str:
        return "newton"

    def fit(self, data: Dataset) -> NewtonState:
        return self.start(fit_trained(self.train, data))

    def start(self, trained: Trained) -> NewtonState:
        """G and H at the trained model θ_T over its rows: the one O(n·p²) pass."""
        check_convex(trained.model)
        data = trained.rows.active()
        theta = trained.params
        G = trained.model.grad_sum(theta, data.X, data.y)
        H = hessian_sum(trained.model, theta, data.X, data.y)
        return NewtonState(trained.model, trained.rows, theta, G, H, len(data), theta)

    def change(self, state: NewtonState, *, delete_ids: Tensor | None = None,
               add: Dataset | None = None) -> ChangeSet:
        return request(state.rows, delete_ids=delete_ids, add=add, n_classes=state.model.n_classes)

    def apply(self, state: NewtonState, change: ChangeSet) -> Outcome:
        model, a = state.model, state.anchor
        Xd, yd = state.rows.data.X[change.delete], state.rows.data.y[change.delete]
        G = state.grad_sum - model.grad_sum(a, Xd, yd)
        H = state.hess_sum - hessian_sum(model, a, Xd, yd)
        n = state.n - len(change.delete)
        if change.add is not None and len(change.add):
            G = G + model.grad_sum(a, change.add.X, change.add.y)
            H = H + hessian_sum(model, a, change.add.X, change.add.y)
            n += len(change.add)
        l2 = self.train.l2
        grad = G / n + l2 * a
        hess = H / n + l2 * torch.eye(model.p, dtype=a.dtype, device=a.device)
        theta = a - _solve_spd(hess, grad)
        new = NewtonState(model, state.rows.after(change), a, G, H, n, theta)
        return Outcome(new, theta, {"gradient_norm_at_anchor": float(grad.norm())})

    def exact(self, state: NewtonState, change: ChangeSet) -> Outcome:
        """The minimiser of the changed objective (Newton's method to convergence from θ_T)."""
        rows = state.rows.after(change)
        data = rows.active()
        theta, G, H = minimize(state.model, data, self.train.l2, state.anchor)
        return Outcome(NewtonState(state.model, rows, theta, G, H, len(data), theta), theta, {})

    def evaluate(self, state: NewtonState, X: Tensor, y: Tensor) -> dict[str, float]:
        return state.model.evaluate(state.params, X, y)
