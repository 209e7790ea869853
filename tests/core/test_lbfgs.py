"""The compact L-BFGS product against the textbook BFGS recursion, and its safeguards."""

import pytest
import torch

from deltagrad_ray.core import DeltaGradConfig, Replay, make_change_set
from deltagrad_ray.core import lbfgs

from .problems import problem


def _pairs(p=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, p, generator=g, dtype=torch.float64)
    H = A @ A.T / p + 0.5 * torch.eye(p, dtype=torch.float64)  # SPD "Hessian"
    S = torch.randn(k, p, generator=g, dtype=torch.float64)
    return H, S, S @ H  # y_i = H s_i


def _dense_bfgs(S, Y, sigma):
    B = sigma * torch.eye(S.shape[1], dtype=torch.float64)
    for s, y in zip(S, Y):
        Bs = B @ s
        B = B - torch.outer(Bs, Bs) / (s @ Bs) + torch.outer(y, y) / (y @ s)
    return B


@pytest.mark.parametrize("rule", lbfgs.SIGMA_RULES)
def test_compact_form_equals_the_bfgs_recursion(rule):
    H, S, Y = _pairs()
    h = lbfgs.empty_history(3, S.shape[1], rule=rule)
    for s, y in zip(S, Y):
        h = lbfgs.push(h, s, y)
    v = torch.randn(S.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    B = _dense_bfgs(S, Y, h.sigma)
    assert torch.allclose(lbfgs.hvp(h, v)[0], B @ v, rtol=1e-9, atol=1e-12)


def test_sigma_rules_are_the_documented_formulas():
    _, S, Y = _pairs()
    h = lbfgs.push(lbfgs.push(lbfgs.empty_history(2, S.shape[1]), S[0], Y[0]), S[1], Y[1])
    s, y = S[1], Y[1]
    assert lbfgs.sigma(h, "sy/ss") == pytest.approx(float(s @ y / (s @ s)))
    assert lbfgs.sigma(h, "yy/sy") == pytest.approx(float(y @ y / (s @ y)))
    # the default is the authors' rule (10x more accurate on MNIST logistic regression)
    assert DeltaGradConfig().sigma == "sy/ss"


def test_quadratic_along_the_history_is_reproduced_exactly():
    # on a quadratic, B·s_i = y_i for the newest pair (secant equation)
    H, S, Y = _pairs(k=2)
    h = lbfgs.push(lbfgs.push(lbfgs.empty_history(2, S.shape[1]), S[0], Y[0]), S[1], Y[1])
    assert torch.allclose(lbfgs.hvp(h, S[1])[0], Y[1], rtol=1e-9)


def test_ring_buffer_keeps_the_newest_m_pairs():
    _, S, Y = _pairs(k=3)
    h = lbfgs.empty_history(2, S.shape[1])
    for s, y in zip(S, Y):
        h = lbfgs.push(h, s, y)
    assert h.size == 2 and torch.equal(h.S, S[1:]) and torch.equal(h.Y, Y[1:])


def test_curvature_check_rejects_bad_pairs():
    s = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert lbfgs.curvature_ok(s, torch.tensor([1.0, 0.1], dtype=torch.float64), 1e-6)
    assert not lbfgs.curvature_ok(s, torch.tensor([-1.0, 0.0], dtype=torch.float64), 1e-6)  # negative
    assert not lbfgs.curvature_ok(s, torch.tensor([1e-9, 1.0], dtype=torch.float64), 1e-6)  # ~orthogonal
    assert not lbfgs.curvature_ok(torch.zeros(2, dtype=torch.float64), s, 1e-6)  # s = 0
    assert not lbfgs.curvature_ok(s, torch.tensor([float("nan"), 0.0], dtype=torch.float64), 1e-6)


def test_empty_history_gives_no_product():
    assert lbfgs.hvp(lbfgs.empty_history(2, 3), torch.ones(3, dtype=torch.float64)) is None


def test_approximation_beyond_the_observed_curvature_falls_back_to_an_explicit_step():
    # a nearly orthogonal pair passes the curvature test but makes ‖B‖ huge; the guard must
    # refuse the product, take an explicit step instead, and count it
    p = problem("logreg", "gd")
    change = make_change_set(p.data, delete_ids=torch.arange(40), n_classes=p.n_classes)
    rp = Replay(p.model, p.traj, p.data, change, DeltaGradConfig(curvature_eps=1e-12))
    seg = next(p.traj.segments(0, p.traj.steps))
    st = rp.start()
    for t in range(11):  # burn-in: real pairs, L̂ measured
        st = rp._step(st, t, seg.params[t], seg.grads[t], float(seg.lrs[t]), None)
    assert not rp.explicit[11] and st.fallbacks == 0
    v = st.w - seg.params[11]
    s = torch.randn(p.model.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = s - (s @ v) / (v @ v) * v  # orthogonal to v
    y = v * 1e3 + s * 1e-9         # sᵀy tiny, ‖y‖ large
    bad = lbfgs.push(lbfgs.empty_history(2, p.model.p), s, y)
    Bv, ratio = lbfgs.hvp(bad, v)
    assert ratio > 10 * st.curvature
    st2 = rp._step(st._replace(history=bad), 11, seg.params[11], seg.grads[11], float(seg.lrs[11]), None)
    assert st2.fallbacks == 1 and st2.explicit_steps == st.explicit_steps + 1
    assert torch.isfinite(st2.w).all()
