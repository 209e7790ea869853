"""Models as functions of one flat parameter vector.

Every model enters the core through :func:`torch.func.functional_call`: an ``nn.Module``
supplies the architecture, a per-example loss supplies ℓ_i, and the core only ever sees a
flat vector θ of ``p`` numbers. The objective trained and replayed everywhere is

    F_B(θ) = (1/|B|) Σ_{i∈B} ℓ_i(θ) + (λ/2)·‖θ‖²          (Wu et al. 2020, eq. 1)

with the L2 term over all parameters. Gradients of the loss *sum* over rows come from
:meth:`FunctionalModel.grad_sum`; the regulariser and the 1/|B| are applied by the callers,
so that the contribution of a few rows can be subtracted exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .errors import InputError

KINDS = ("logreg", "linear", "mlp")
PerExampleLoss = Callable[[Tensor, Tensor], Tensor]


def cross_entropy_loss(outputs: Tensor, labels: Tensor) -> Tensor:
    """Per-example multinomial cross-entropy, (n, c) logits and (n,) class indices -> (n,)."""
    return nn.functional.cross_entropy(outputs, labels, reduction="none")


def squared_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example ½(f(x) − y)², (n, 1) or (n,) outputs -> (n,)."""
    return 0.5 * (outputs.reshape(-1) - targets) ** 2


class ManyRef(NamedTuple):
    """A reference point for batched gradients in difference form.

    Fields:
      theta: (p,) reference parameters w_t (the cached step's)
      grad:  (p,) Σ_i w_i ∇ℓ_i(w_t) over the same rows, in full precision
      X_low: (n, d) the rows in the low precision used for the difference GEMMs
    """

    theta: Tensor
    grad: Tensor
    X_low: Tensor


class _ClosedForm:
    """Closed-form gradients of a linear model: one request (GEMV-like), many requests over the
    same rows (one GEMM, optionally in difference form), and many requests over their own rows
    (bmm). Same values as autograd through functional_call (tested), without its overhead."""

    def __init__(self, kind: str, c: int, d: int) -> None:
        self.kind, self.c, self.d = kind, c, d

    def _split(self, thetas: Tensor) -> tuple[Tensor, Tensor]:
        c, d = self.c, self.d
        return thetas[..., : c * d].unflatten(-1, (c, d)), thetas[..., c * d:]

    def residual(self, Z: Tensor, y: Tensor) -> Tensor:
        """∂ℓ/∂z for logits/outputs Z (..., c) and labels y (...): softmax − onehot, or f(x) − y."""
        raise NotImplementedError

    # one request: Σ_i w_i ∇ℓ_i(θ)
    def grad_sum(self, theta: Tensor, X: Tensor, y: Tensor, weights: Tensor | None) -> Tensor:
        W, b = self._split(theta)
        R = self.residual(torch.addmm(b, X, W.T), y)  # (n, c)
        if weights is not None:
            R = R * weights[:, None]
        return torch.cat([(R.T @ X).reshape(-1), R.sum(0)])

    # many requests over shared rows: (B, p)
    BLOCK = 8192  # rows per block: keeps the (rows × c × B) logits in cache-sized, reused buffers

    def grad_many(self, thetas: Tensor, X: Tensor, y: Tensor, weights: Tensor | None,
                  ref: ManyRef | None = None) -> Tensor:
        """Σ_i w_i ∇ℓ_i(θ_b) for B parameter vectors: two GEMMs per block of rows.

        Logits are laid out (rows, c, B) so the softmax over c is vectorised across requests.
        With ``ref``, in difference form: z_b = z_ref + X·(θ_b − θ_ref), the differences through
        GEMMs in ``ref.X_low``'s precision, the reference point in full precision.
        """
        B, (c, d), n = thetas.shape[0], (self.c, self.d), X.shape[0]
        W, b = self._split(thetas)                                   # (B, c, d), (B, c)
        full = X.dtype
        if ref is None:
            Wt, bt = W.transpose(0, 1).reshape(c * B, d), b.T.reshape(c * B)
        else:
            low = ref.X_low.dtype
            Wr, br = self._split(ref.theta)
            dW, db = self._split(thetas - ref.theta)
            Wt = dW.transpose(0, 1).reshape(c * B, d).to(low)
            bt = db.T.reshape(c * B)
        G = torch.zeros(c * B, d, dtype=full, device=X.device)
        gb = torch.zeros(c * B, dtype=full, device=X.device)
        Zbuf = torch.empty(min(self.BLOCK, n), c * B, dtype=full, device=X.device)
        for i in range(0, n, self.BLOCK):
            Xb, yb = X[i:i + self.BLOCK], y[i:i + self.BLOCK]
            m = Xb.shape[0]
            Z = Zbuf[:m]
            if ref is None:
                torch.addmm(bt, Xb, Wt.T, out=Z)
            else:
                Xl = ref.X_low[i:i + self.BLOCK]
                Z.copy_(Xl @ Wt.T)
                Z += bt
                Zr = torch.addmm(br, Xb, Wr.T)                       # (m, c) reference logits
                Z.view(m, c, B).add_(Zr[:, :, None])
            R = self.residual_cb(Z.view(m, c, B), yb)                # (m, c, B)
            if ref is not None:
                R -= self.residual(Zr, yb)[:, :, None]
            if weights is not None:
                R *= weights[i:i + self.BLOCK, None, None]
            R2 = R.reshape(m, c * B)
            if ref is None:
                G.addmm_(R2.T, Xb)
            else:
                G += (R2.T.to(low) @ Xl).to(full)
            gb += R2.sum(0)
        out = torch.cat([G.view(c, B, d).transpose(0, 1).reshape(B, c * d), gb.view(c, B).T], dim=1)
        return out if ref is None else ref.grad + out

    # many requests over their own rows, padded: X (B, r, d), y (B, r), weights (B, r)
    def grad_each(self, thetas: Tensor, X: Tensor, y: Tensor, weights: Tensor) -> Tensor:
        W, b = self._split(thetas)                                       # (B, c, d), (B, c)
        R = self.residual(torch.baddbmm(b[:, None, :], X, W.transpose(1, 2)), y) * weights[..., None]
        return torch.cat([torch.bmm(R.transpose(1, 2), X).flatten(1), R.sum(1)], dim=1)


class _Softmax(_ClosedForm):
    """Multinomial logistic regression, θ = [W (c×d), b (c)]: ∇_W = (P − Y)ᵀX, ∇_b = Σ(P − Y)."""

    def residual(self, Z: Tensor, y: Tensor) -> Tensor:
        R = torch.softmax(Z, dim=-1)
        return R - nn.functional.one_hot(y, self.c).to(R.dtype)

    def residual_cb(self, Z: Tensor, y: Tensor) -> Tensor:
        """Logits laid out (m, c, B): softmax over c minus the one-hot of y."""
        R = torch.softmax(Z, dim=1)
        R[torch.arange(len(y), device=y.device), y] -= 1
        return R


class _LeastSquares(_ClosedForm):
    """½(xᵀw + b − y)², θ = [w (d), b]: ∇_w = Σ r_i x_i, ∇_b = Σ r_i with r = f(x) − y."""

    def residual(self, Z: Tensor, y: Tensor) -> Tensor:
        return Z - y[..., None].to(Z.dtype)

    def residual_cb(self, Z: Tensor, y: Tensor) -> Tensor:
        return Z - y[:, None, None].to(Z.dtype)


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model, as stored in a cache manifest.

    Args:
      kind: ``"logreg"`` (multinomial logistic regression), ``"linear"`` (least squares) or
        ``"mlp"`` (ReLU network, classification).
      n_features: input width d.
      n_classes: c ≥ 2 for ``logreg``/``mlp``; 1 for ``linear``.
      hidden: hidden layer sizes of the MLP, e.g. ``(300, 100)``.
    """

    kind: str
    n_features: int
    n_classes: int = 1
    hidden: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"model must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.n_features < 1:
            raise InputError(f"n_features must be >= 1, got {self.n_features}")
        if self.kind == "linear" and self.n_classes != 1:
            raise InputError(f"the linear model has 1 output, got n_classes={self.n_classes}")
        if self.kind != "linear" and self.n_classes < 2:
            raise InputError(f"{self.kind} needs n_classes >= 2, got {self.n_classes}")
        if self.kind == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise InputError(f"mlp needs hidden sizes >= 1, e.g. (300, 100); got {self.hidden!r}")
        if self.kind != "mlp" and self.hidden:
            raise InputError(f"hidden sizes apply to mlp only, got {self.hidden!r} for {self.kind}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    @property
    def task(self) -> str:
        return "regression" if self.kind == "linear" else "classification"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n_features": self.n_features,
                "n_classes": self.n_classes, "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(d["kind"], int(d["n_features"]), int(d["n_classes"]), tuple(d.get("hidden", ())))

    def build(self) -> FunctionalModel:
        """The functional model this spec describes."""
        d, c = self.n_features, self.n_classes
        if self.kind == "logreg":
            return FunctionalModel(nn.Linear(d, c), cross_entropy_loss, n_classes=c, spec=self,
                                   closed_form=_Softmax("logreg", c, d))
        if self.kind == "linear":
            return FunctionalModel(nn.Linear(d, 1), squared_loss, n_classes=None, spec=self,
                                   closed_form=_LeastSquares("linear", 1, d))
        widths = (d, *self.hidden, c)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        return FunctionalModel(nn.Sequential(*layers), cross_entropy_loss, n_classes=c, spec=self)


class FunctionalModel:
    """An ``nn.Module`` and a per-example loss, seen as functions of a flat vector θ.

    Args:
      module: the architecture. Its parameters give names, shapes and (for models without a
        spec) the initial point; they are never updated.
      loss: per-example loss ``(outputs, labels) -> (n,)``.
      n_classes: number of classes for classification, ``None`` for regression.
      spec: the built-in spec this model came from, if any (linear kinds start at θ = 0,
        the MLP from a seeded uniform initialisation).
      closed_form: optional closed-form gradients (the built-in linear models); autograd
        through functional_call (``torch.func.grad``, ``vmap`` for many requests) otherwise.

    Example:
      >>> m = ModelSpec("logreg", n_features=4, n_classes=3).build()
      >>> theta = m.init_params(seed=0)
      >>> m.grad_sum(theta, torch.randn(5, 4, dtype=theta.dtype), torch.tensor([0, 1, 2, 0, 1])).shape
      torch.Size([15])
    """

    def __init__(self, module: nn.Module, loss: PerExampleLoss, *, n_classes: int | None,
                 spec: ModelSpec | None = None, closed_form: _ClosedForm | None = None) -> None:
        named = [(k, v) for k, v in module.named_parameters()]
        if not named:
            raise InputError("the module has no parameters to train")
        if list(module.buffers()):
            raise InputError("modules with buffers (e.g. BatchNorm) are not supported: "
                             "the trajectory would not determine the model")
        self.module = module
        self.loss = loss
        self.n_classes = n_classes
        self.spec = spec
        self.names = tuple(k for k, _ in named)
        self.shapes = tuple(tuple(v.shape) for _, v in named)
        self.sizes = tuple(math.prod(s) for s in self.shapes)
        self.p = sum(self.sizes)
        self._module_init = torch.cat([v.detach().reshape(-1).to(torch.float64) for _, v in named])
        self._autograd = grad(self._loss_sum)
        self.closed_form = closed_form
        self._grad = closed_form.grad_sum if closed_form is not None else self._autograd
        self._many = vmap(self._autograd, in_dims=(0, None, None, None))
        self._each = vmap(self._autograd, in_dims=(0, 0, 0, 0))

    @property
    def task(self) -> str:
        return "regression" if self.n_classes is None else "classification"

    # -- parameters -------------------------------------------------------------------
    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of θ (p,) as the module's named parameters."""
        parts = torch.split(theta, self.sizes)
        return {k: v.view(s) for k, v, s in zip(self.names, parts, self.shapes)}

    def flatten(self, params: dict[str, Tensor]) -> Tensor:
        """The flat vector (p,) of named parameters, in the module's order."""
        missing = [k for k in self.names if k not in params]
        if missing:
            raise InputError(f"parameters missing: {missing}; expected {list(self.names)}")
        for k, s in zip(self.names, self.shapes):
            if tuple(params[k].shape) != s:
                raise InputError(f"parameter {k!r} has shape {tuple(params[k].shape)}, expected {s}")
        return torch.cat([params[k].reshape(-1) for k in self.names])

    def init_params(self, seed: int = 0, dtype: torch.dtype = torch.float64,
                    device: torch.device | str = "cpu") -> Tensor:
        """θ_0: zeros for the linear models, a seeded uniform init for the MLP, else the module's."""
        if self.spec is not None and self.spec.kind in ("logreg", "linear"):
            return torch.zeros(self.p, dtype=dtype, device=device)
        if self.spec is not None and self.spec.kind == "mlp":
            # PyTorch's default Linear init, U(±1/√fan_in), drawn from a seeded CPU generator in
            # float64 so that the same seed gives the same start on every device and dtype.
            gen = torch.Generator().manual_seed(int(seed))
            parts = []
            for shape in self.shapes:
                fan_in = shape[1] if len(shape) == 2 else self.shapes[len(parts) - 1][1]
                bound = 1.0 / math.sqrt(fan_in)
                parts.append((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
            return torch.cat([q.reshape(-1) for q in parts]).to(dtype=dtype, device=device)
        return self._module_init.to(dtype=dtype, device=device)

    # -- evaluation -------------------------------------------------------------------
    def forward(self, theta: Tensor, X: Tensor) -> Tensor:
        return functional_call(self.module, self.unflatten(theta), (X,))

    def _loss_sum(self, theta: Tensor, X: Tensor, y: Tensor, weights: Tensor | None) -> Tensor:
        per_example = self.loss(self.forward(theta, X), y)
        return per_example.sum() if weights is None else per_example @ weights

    def loss_sum(self, theta: Tensor, X: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
        """Σ_i w_i ℓ_i(θ) over the rows of X (w_i = 1 when weights is None)."""
        return self._loss_sum(theta, X, y, weights)

    def grad_sum(self, theta: Tensor, X: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
        """Σ_i w_i ∇ℓ_i(θ), shape (p,). No regulariser, no 1/n: callers add those."""
        if X.shape[0] == 0:
            return torch.zeros_like(theta)
        return self._grad(theta, X, y, weights)

    def autograd_grad_sum(self, theta: Tensor, X: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
        """:meth:`grad_sum` by autograd through functional_call (the reference for closed forms)."""
        return self._autograd(theta, X, y, weights)

    def grad_sum_many(self, thetas: Tensor, X: Tensor, y: Tensor, weights: Tensor | None = None,
                      ref: ManyRef | None = None) -> Tensor:
        """Σ_i w_i ∇ℓ_i(θ_b) for B parameter vectors over the same rows: (B, p).

        One pass over X for all B (a GEMM for the linear models, ``vmap`` otherwise). With
        ``ref`` (linear models only), in difference form around a reference point, the GEMMs in
        ``ref.X_low``'s precision.
        """
        if X.shape[0] == 0:
            return torch.zeros_like(thetas)
        if self.closed_form is not None:
            return self.closed_form.grad_many(thetas, X, y, weights, ref)
        return self._many(thetas, X, y, weights)

    def grad_sum_each(self, thetas: Tensor, X: Tensor, y: Tensor, weights: Tensor) -> Tensor:
        """Σ_j w_bj ∇ℓ(θ_b; x_bj, y_bj) with each request's own (padded) rows: X (B, r, d) → (B, p)."""
        if X.shape[1] == 0:
            return torch.zeros_like(thetas)
        if thetas.shape[0] == 1:  # one request: the plain kernel (a batched one costs more per call)
            return self.grad_sum(thetas[0], X[0], y[0], weights[0])[None]
        if self.closed_form is not None:
            return self.closed_form.grad_each(thetas, X, y, weights)
        return self._each(thetas, X, y, weights)

    def predict(self, theta: Tensor, X: Tensor) -> Tensor:
        """Class indices (classification) or real predictions (regression)."""
        out = self.forward(theta, X)
        return out.argmax(dim=1) if self.task == "classification" else out.reshape(-1)

    def evaluate(self, theta: Tensor, X: Tensor, y: Tensor) -> dict[str, float]:
        """Mean loss and accuracy (classification) or MSE (regression) on (X, y)."""
        with torch.no_grad():
            out = self.forward(theta, X)
            loss = float(self.loss(out, y).mean())
            if self.task == "classification":
                return {"loss": loss, "accuracy": float((out.argmax(1) == y).double().mean())}
            return {"loss": loss, "mse": float(((out.reshape(-1) - y) ** 2).mean())}
