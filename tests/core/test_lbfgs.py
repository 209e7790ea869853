"""The compact L-BFGS products against the textbook BFGS recursion, and their safeguards."""

import pytest
import torch

from deltagrad_ray.core import DeltaGradConfig, Replay, make_change_set
from deltagrad_ray.core import lbfgs
from deltagrad_ray.core.config import SIGMA_RULES

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


def _history(S, Y, m, rule="sy/ss", B=1):
    """B identical histories built by pushing the pairs one by one."""
    h = lbfgs.empty(B, m, S.shape[1], rule=rule)
    ones = torch.ones(B, dtype=torch.bool)
    for s, y in zip(S, Y):
        h = lbfgs.push(h, s.expand(B, -1), y.expand(B, -1), ones)
    return h


@pytest.mark.parametrize("rule", SIGMA_RULES)
def test_compact_form_equals_the_bfgs_recursion(rule):
    H, S, Y = _pairs()
    h = _history(S, Y, 3, rule)
    v = torch.randn(S.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    B = _dense_bfgs(S, Y, float(h.sigma[0]))
    Bv, ratio, usable = lbfgs.hvp(h, v[None])
    assert bool(usable[0]) and torch.allclose(Bv[0], B @ v, rtol=1e-9, atol=1e-12)
    assert float(ratio[0]) == pytest.approx(float((B @ v).norm() / v.norm()))


def test_histories_of_a_batch_are_independent():
    # three requests with different pairs and different fill levels: each product equals its own
    # dense BFGS matrix, whatever the others hold
    ps = [_pairs(seed=s) for s in (0, 1, 2)]
    h = lbfgs.empty(3, 3, 12)
    for i in range(3):
        mask = torch.tensor([i < 3, i < 2, i < 1])
        s = torch.stack([S[i] for _, S, _ in ps])
        y = torch.stack([Y[i] for _, _, Y in ps])
        h = lbfgs.push(h, s, y, mask)
    assert h.count.tolist() == [3, 2, 1]
    V = torch.randn(3, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    Bv, _, usable = lbfgs.hvp(h, V)
    assert usable.all()
    for b, k in enumerate((3, 2, 1)):
        _, S, Y = ps[b]
        dense = _dense_bfgs(S[:k], Y[:k], float(h.sigma[b]))
        assert torch.allclose(Bv[b], dense @ V[b], rtol=1e-9, atol=1e-12)
    # ... and a selected sub-batch gives the same products
    sub = h.select([2, 0])
    Bs, _, _ = lbfgs.hvp(sub, V[[2, 0]])
    assert torch.equal(Bs, Bv[[2, 0]])


def test_pushes_that_every_history_takes_equal_the_masked_path_bit_for_bit():
    # push has a shortcut when every history takes its pair, and prepare one when every slot is in use;
    # beside a third history that never takes a pair (the general path, never full) the same two
    # histories must come out bit for bit the same, before and after the slots fill up
    ps = [_pairs(seed=s) for s in (3, 4)]
    fast, slow = lbfgs.empty(2, 2, 12), lbfgs.empty(3, 2, 12)
    for i in range(3):
        s = torch.stack([S[i] for _, S, _ in ps])
        y = torch.stack([Y[i] for _, _, Y in ps])
        fast = lbfgs.push(fast, s, y, torch.tensor([True, True]))
        slow = lbfgs.push(slow, torch.cat([s, s[:1]]), torch.cat([y, y[:1]]), torch.tensor([True, True, False]))
        for f in ("S", "Y", "count", "sigma", "Wc", "LU", "piv", "ok", "bound"):
            assert torch.equal(getattr(fast, f), getattr(slow, f)[:2]), f"push {i}: {f}"
    assert fast.count.tolist() == [2, 2] and slow.count.tolist() == [2, 2, 0]


def test_sigma_rules_are_the_documented_formulas():
    _, S, Y = _pairs()
    s, y = S[1], Y[1]
    assert float(_history(S[:2], Y[:2], 2, "sy/ss").sigma[0]) == pytest.approx(float(s @ y / (s @ s)))
    assert float(_history(S[:2], Y[:2], 2, "yy/sy").sigma[0]) == pytest.approx(float(y @ y / (s @ y)))
    # the default is the authors' rule (10x more accurate on MNIST logistic regression)
    assert DeltaGradConfig().sigma == "sy/ss"


def test_quadratic_along_the_history_is_reproduced_exactly():
    # on a quadratic, B·s_i = y_i for the newest pair (secant equation)
    H, S, Y = _pairs(k=2)
    Bv, _, _ = lbfgs.hvp(_history(S, Y, 2), S[1][None])
    assert torch.allclose(Bv[0], Y[1], rtol=1e-9)


def test_ring_buffer_keeps_the_newest_m_pairs():
    _, S, Y = _pairs(k=3)
    h = _history(S, Y, 2)
    assert int(h.count[0]) == 2 and torch.equal(h.S[0], S[1:]) and torch.equal(h.Y[0], Y[1:])


def test_curvature_check_rejects_bad_pairs():
    s = torch.tensor([1.0, 0.0], dtype=torch.float64)
    ys = torch.tensor([[1.0, 0.1], [-1.0, 0.0], [1e-9, 1.0], [float("nan"), 0.0]], dtype=torch.float64)
    # fine; negative curvature; nearly orthogonal; not finite
    assert lbfgs.curvature_ok(s.expand(4, -1), ys, 1e-6).tolist() == [True, False, False, False]
    assert not bool(lbfgs.curvature_ok(torch.zeros(1, 2, dtype=torch.float64), s[None], 1e-6)[0])  # s = 0


def test_empty_history_gives_no_usable_product():
    _, _, usable = lbfgs.hvp(lbfgs.empty(2, 2, 3), torch.ones(2, 3, dtype=torch.float64))
    assert not usable.any()


def test_approximation_beyond_the_observed_curvature_falls_back_to_an_explicit_step():
    # a nearly orthogonal pair passes the curvature test but makes ‖B‖ huge; the guard must
    # refuse the product, take an explicit step instead, and count it
    p = problem("logreg", "gd")
    change = make_change_set(p.data, delete_ids=torch.arange(40), n_classes=p.n_classes)
    rp = Replay(p.model, p.traj, p.data, [change], DeltaGradConfig(curvature_eps=1e-12, curvature="own"))
    seg = next(p.traj.segments(0, p.traj.steps))
    st = rp.start()
    for t in range(11):  # burn-in: real pairs, L̂ measured
        st = rp._step(st, t, seg.params[t], seg.grads[t], float(seg.lrs[t]), None)
    assert not rp.explicit[11] and int(st.fallbacks[0]) == 0
    v = st.W[0] - seg.params[11]
    s = torch.randn(p.model.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = s - (s @ v) / (v @ v) * v  # orthogonal to v
    y = v * 1e3 + s * 1e-9         # sᵀy tiny, ‖y‖ large
    bad = lbfgs.push(lbfgs.empty(1, 2, p.model.p), s[None], y[None], torch.tensor([True]))
    _, ratio, _ = lbfgs.hvp(bad, v[None])
    assert float(ratio[0]) > 10 * float(st.curvature[0])
    st2 = rp._step(st.replace(history=bad), 11, seg.params[11], seg.grads[11], float(seg.lrs[11]), None)
    assert int(st2.fallbacks[0]) == 1 and int(st2.explicit_steps[0]) == int(st.explicit_steps[0]) + 1
    assert torch.isfinite(st2.W).all()
