"""Curvature beyond a request's own pairs: the batch's shared multi-secant model and the cached
path's free secant pairs, against exact retraining; and the batched exact retraining baseline."""

from __future__ import annotations

import pytest
import torch

from deltagrad_ray.core import (DeltaGradConfig, deltagrad, deltagrad_batched, k_fold, leave_one_out, lbfgs,
                                make_change_set, relative_error, retrain, retrain_batched)

from .problems import N, problem, random_ids

CONVEX_BOUND = 0.05  # as in test_replay.py: DeltaGrad must remove 95% of the change's effect


def _requests(p):
    return (leave_one_out(p.data, p.data.ids[:6])
            + [make_change_set(p.data, delete_ids=random_ids(N, 80, seed=4), n_classes=p.n_classes),
               make_change_set(p.data, add=p.extra, n_classes=p.n_classes)])


@pytest.mark.parametrize("kind", ["logreg", "linear"])
@pytest.mark.parametrize("optimizer,curvature,K", [("gd", "shared", 4), ("gd", "own+path", 4),
                                                   ("sgd", "shared", 1)])  # SGD: one mini-batch's pairs
def test_other_curvature_matches_exact_retraining(kind, optimizer, curvature, K):
    p = problem(kind, optimizer)
    changes = _requests(p)
    res = deltagrad_batched(p.model, p.traj, p.data, changes,
                            DeltaGradConfig(curvature=curvature, shared_history=K, period=5), batch_size=8)
    for b, ch in enumerate(changes):
        exact = retrain(p.model, p.traj, p.data, ch)
        assert float((exact - p.traj.final).norm()) > 1e-8
        ratio = relative_error(res.params[b], exact, p.traj.final)
        assert ratio <= CONVEX_BOUND, f"{kind}/{optimizer}/{curvature} request {b}: error ratio {ratio:.4f}"
    assert int(res.approx_steps.sum()) > int(res.explicit_steps.sum())


def test_multi_secant_curvature_is_more_accurate_than_own_lbfgs_pairs():
    # GD, LOO requests, T0 = 10. Measured on this problem (median over 16): own (L-BFGS, m = 2)
    # 0.016; secant (each request's pairs of its last 4 explicit steps) 0.001; shared (the batch's
    # pairs, at most p/2 = 22 of them here) 0.013
    p = problem("logreg", "gd")
    changes = leave_one_out(p.data, p.data.ids[:16])
    exact = retrain_batched(p.model, p.traj, p.data, changes, batch_size=16)
    err = {}
    for curvature in ("own", "secant", "shared"):
        res = deltagrad_batched(p.model, p.traj, p.data, changes, DeltaGradConfig(period=10, curvature=curvature),
                                batch_size=16)
        err[curvature] = sorted(relative_error(res.params[b], exact[b], p.traj.final) for b in range(16))[8]
    assert err["secant"] < 0.2 * err["own"], err
    assert err["shared"] < err["own"], err


def test_secant_results_do_not_depend_on_the_batch():
    """Each request's own model: a batch of 8 and 8 single replays agree (up to round-off)."""
    p = problem("logreg", "gd")
    changes = _requests(p)
    cfg = DeltaGradConfig(curvature="secant")
    batched = deltagrad_batched(p.model, p.traj, p.data, changes, cfg, batch_size=8)
    for b, ch in enumerate(changes):
        one = deltagrad(p.model, p.traj, p.data, ch, cfg)
        assert float((batched.params[b] - one.params).norm()) <= 1e-9 * float(one.params.norm())


def test_path_pairs_are_refused_for_sgd_trajectories():
    from deltagrad_ray.core import InputError
    p = problem("logreg", "sgd")
    with pytest.raises(InputError, match="curvature own\\+path needs a trajectory trained by gradient descent"):
        deltagrad(p.model, p.traj, p.data, _requests(p)[0], DeltaGradConfig(curvature="own+path"))


def test_shared_curvature_for_one_request_uses_its_own_recent_pairs():
    p = problem("logreg", "gd")
    ch = make_change_set(p.data, delete_ids=random_ids(N, 40, seed=9), n_classes=p.n_classes)
    res = deltagrad(p.model, p.traj, p.data, ch, DeltaGradConfig(curvature="shared"))
    exact = retrain(p.model, p.traj, p.data, ch)
    assert relative_error(res.params, exact, p.traj.final) <= CONVEX_BOUND


def test_the_shared_model_solves_the_secant_equations_on_its_span():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    H = A @ A.T / 30 + torch.eye(30, dtype=torch.float64)
    sp = lbfgs.shared_empty(30)
    for e in range(3):
        s = torch.randn(4, 30, generator=g, dtype=torch.float64)
        sp = lbfgs.shared_add(sp, s, s @ H, torch.ones(4, dtype=torch.bool), step=e, keep_events=2)
    assert sp.S.shape[0] == 8 and sorted(set(sp.events.tolist())) == [1, 2]   # the last 2 explicit steps
    Hs, _, usable = lbfgs.shared_hvp(sp, sp.S)
    assert usable.all() and torch.allclose(Hs, sp.Y, rtol=1e-9, atol=1e-9)      # H s_i = y_i
    v = torch.randn(1, 30, generator=g, dtype=torch.float64)
    off = v - (v @ sp.U) @ sp.U.T                                               # off the pairs' span: σ·v
    Hoff, _, _ = lbfgs.shared_hvp(sp, off)
    assert torch.allclose(Hoff, sp.sigma * off, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["gd", "sgd"])
def test_batched_exact_retraining_equals_retraining_each_request(optimizer):
    p = problem("logreg", optimizer)
    changes = _requests(p) + k_fold(p.data, 4, seed=1)[:2]
    got = retrain_batched(p.model, p.traj, p.data, changes, batch_size=5)
    for b, ch in enumerate(changes):
        want = retrain(p.model, p.traj, p.data, ch)
        # the same steps, summed in another order (a GEMM over the batch's rows minus the deleted
        # rows, against a sum over the retained rows): round-off only
        assert float((got[b] - want).norm()) <= 1e-9 * float((want - p.traj.final).norm()) + 1e-12
