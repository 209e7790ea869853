"""Compact-form L-BFGS products B·v from a short history of (s, y) pairs.

Byrd, Nocedal & Schnabel (1994), Theorem 2.3: with S = [s_0 … s_{k-1}], Y = [y_0 … y_{k-1}],

    B = σI − [σS  Y] · M⁻¹ · [σSᵀ; Yᵀ],     M = [[σSᵀS, L], [Lᵀ, −D]],

where L is the strictly lower triangle of SᵀY and D its diagonal. DeltaGrad uses B_t·v as a
cheap stand-in for the Hessian-vector product of the objective along v = w^I_t − w_t
(Wu et al. 2020, Alg. 1, line 10). The history is a fixed-size ring buffer held in an
immutable NamedTuple: pushing returns a new history, nothing is modified in place.

Safeguards (the research code had none): pairs that fail the curvature test
sᵀy > ε‖s‖‖y‖ are skipped; M is solved, never inverted; a product that is not finite or
exceeds the bound ‖B‖ ≤ σ + Σ‖y_i‖²/(s_iᵀy_i) (which holds in exact arithmetic) is reported
as unusable so the caller can take an explicit step instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .config import SIGMA_RULES  # noqa: E402  (one definition)


class LbfgsHistory(NamedTuple):
    """The last m accepted (s, y) pairs, oldest first, with the compact form prepared.

    Fields:
      S:     (k, p) parameter differences s_i = w^I − w, k ≤ m
      Y:     (k, p) gradient differences y_i = ∇F(w^I) − ∇F(w)
      m:     capacity
      rule:  σ rule the prepared fields use
      sigma: σ of B_0 = σI
      W:     (2k, p) float64 [σS; Y]
      M_lu:  LU factors (and pivots) of the (2k, 2k) middle matrix M, or None if singular
      bound: σ + Σ‖y_i‖²/(s_iᵀy_i), an upper bound on ‖B‖ in exact arithmetic
    """

    S: Tensor
    Y: Tensor
    m: int
    rule: str = "sy/ss"
    sigma: float = 0.0
    W: Tensor | None = None
    M_lu: tuple[Tensor, Tensor] | None = None
    bound: float = 0.0

    @property
    def size(self) -> int:
        return int(self.S.shape[0])


def empty_history(m: int, p: int, dtype: torch.dtype = torch.float64,
                  device: torch.device | str = "cpu", rule: str = "sy/ss") -> LbfgsHistory:
    if rule not in SIGMA_RULES:
        raise ValueError(f"sigma rule must be one of {SIGMA_RULES}, got {rule!r}")
    z = torch.zeros(0, p, dtype=dtype, device=device)
    return LbfgsHistory(z, z, int(m), rule)


def curvature_ok(s: Tensor, y: Tensor, eps: float) -> bool:
    """The curvature test sᵀy > ε‖s‖‖y‖ (and both vectors non-zero and finite)."""
    sy = float(torch.dot(s.double(), y.double()))
    ns, ny = float(s.double().norm()), float(y.double().norm())
    return ns > 0 and ny > 0 and sy == sy and sy > eps * ns * ny and abs(sy) != float("inf")


def _sigma(Sd: Tensor, Yd: Tensor, rule: str) -> float:
    """Scale σ of the initial matrix B_0 = σI, from the newest pair.

    ``"sy/ss"``: σ = sᵀy / sᵀs (what the DeltaGrad authors use; measured 10× more accurate on
    MNIST logistic regression). ``"yy/sy"``: σ = yᵀy / sᵀy (Nocedal & Wright, eq. 7.20).
    """
    s, y = Sd[-1], Yd[-1]
    sy = float(s @ y)
    return sy / float(s @ s) if rule == "sy/ss" else float(y @ y) / sy


def push(h: LbfgsHistory, s: Tensor, y: Tensor) -> LbfgsHistory:
    """A new history with (s, y) appended (oldest dropped when full) and B's compact form
    prepared once, so that each product costs two (2k × p) mat-vecs and a 2k × 2k LU solve."""
    keep = slice(1, None) if h.size == h.m else slice(None)
    S = torch.cat([h.S[keep], s[None]])
    Y = torch.cat([h.Y[keep], y[None]])
    Sd, Yd = S.double(), Y.double()
    SY, SS = Sd @ Yd.T, Sd @ Sd.T
    sig = _sigma(Sd, Yd, h.rule)
    L = torch.tril(SY, diagonal=-1)
    D = torch.diag(torch.diagonal(SY))
    M = torch.cat([torch.cat([sig * SS, L], 1), torch.cat([L.T, -D], 1)], 0)
    LU, piv, info = torch.linalg.lu_factor_ex(M)
    M_lu = (LU, piv) if int(info) == 0 and bool(torch.isfinite(LU).all()) else None
    bound = sig + float(((Yd ** 2).sum(dim=1) / torch.diagonal(SY)).sum())
    return LbfgsHistory(S, Y, h.m, h.rule, sig, torch.cat([sig * Sd, Yd]), M_lu, bound)


def sigma(h: LbfgsHistory, rule: str | None = None) -> float:
    """σ of the history (recomputed when another ``rule`` is asked for)."""
    if rule is None or rule == h.rule:
        return h.sigma
    if rule not in SIGMA_RULES:
        raise ValueError(f"sigma rule must be one of {SIGMA_RULES}, got {rule!r}")
    return _sigma(h.S.double(), h.Y.double(), rule)


def hvp(h: LbfgsHistory, v: Tensor) -> tuple[Tensor, float] | None:
    """(B·v, ‖B·v‖/‖v‖) with B·v = σv − Wᵀ M⁻¹ W v in compact form, or None when the product
    cannot be trusted.

    Cost O(k·p + k²). Returns None for an empty history, a singular middle matrix, a
    non-finite result, or one that breaks the norm bound of a BFGS matrix.
    """
    if h.size == 0 or h.M_lu is None:
        return None
    vd = v.double()
    z = torch.linalg.lu_solve(*h.M_lu, (h.W @ vd)[:, None])[:, 0]
    Bv = h.sigma * vd - h.W.T @ z
    bv, nv = float(Bv.norm()), max(float(vd.norm()), 1e-300)
    if not (bv <= h.bound * (1 + 1e-6) * nv):  # also catches NaN
        return None
    return Bv.to(v.dtype), bv / nv
