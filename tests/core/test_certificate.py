"""The error estimate of every replay (certificate.py) against exact retraining.

Each test compares ``error_estimate`` with the true ratio ‖θ_DG − θ_exact‖ / ‖θ_exact − θ_parent‖: an
estimate of 0 (or one that is not carried through) fails the covering tests, an estimate of inf fails
the "small when accurate" ones.
"""

from __future__ import annotations

import math

import pytest
import torch

from deltagrad_ray.core import (DeltaGradConfig, InputError, Replay, ReplayState, deltagrad, deltagrad_batched,
                                deltagrad_online, leave_one_out, make_change_set, relative_error, retrain,
                                retrain_batched)
from deltagrad_ray.core.certificate import BASIS_CONVEX, BASIS_NONCONVEX, drift_estimate

from .problems import N, problem, random_ids


def _requests(p):
    """Six leave-one-out requests and two multi-row deletions (0.1%, 1%)."""
    return (leave_one_out(p.data, random_ids(N, 6, seed=5))
            + [make_change_set(p.data, delete_ids=random_ids(N, k, seed=6), n_classes=p.n_classes) for k in (8, 80)])


def _truth(p, res, changes):
    exact = retrain_batched(p.model, p.traj, p.data, changes, batch_size=len(changes))
    return torch.tensor([relative_error(res.params[b], exact[b], p.traj.final) for b in range(len(changes))],
                        dtype=torch.float64)


@pytest.mark.parametrize("kind", ["logreg", "linear"])
@pytest.mark.parametrize("settings", [{}, {"curvature": "own", "period": 5}, {"schedule": "geometric"}])
def test_estimate_covers_the_true_error_on_convex_gradient_descent(kind, settings):
    p = problem(kind, "gd")
    changes = _requests(p)
    res = deltagrad_batched(p.model, p.traj, p.data, changes, DeltaGradConfig(**settings), batch_size=len(changes))
    truth = _truth(p, res, changes)
    assert bool((truth > 0).any()), "some replay must differ from retraining for the test to mean anything"
    assert bool((res.error_estimate >= truth).all()), (res.error_estimate.tolist(), truth.tolist())
    assert bool(res.error_reliable.all()) and set(res.error_basis) == {BASIS_CONVEX}


def test_estimate_is_small_when_the_replay_is_accurate_and_large_when_it_is_not():
    p = problem("logreg", "gd")
    changes = _requests(p)
    good = deltagrad_batched(p.model, p.traj, p.data, changes, DeltaGradConfig(), batch_size=len(changes))
    # own pairs with an explicit step every 60 steps after a burn-in of 2: the curvature goes stale
    poor = deltagrad_batched(p.model, p.traj, p.data, changes, DeltaGradConfig(curvature="own", period=60, burn_in=2),
                             batch_size=len(changes))
    t_good, t_poor = _truth(p, good, changes), _truth(p, poor, changes)
    assert float(t_poor.min()) > 0.1, "the poor replay must be poor for the test to mean anything"
    assert bool((good.error_estimate >= t_good).all())
    # measured on this problem: truth ≤ 0.007, estimate ≤ 0.23 (the bound's contraction λ = 0.01 is its slack)
    assert bool(torch.isfinite(good.error_estimate).all()) and float(good.error_estimate.max()) <= 0.5
    assert bool((poor.error_estimate >= t_poor).all())
    assert float(poor.error_estimate.min()) >= 1.0  # not certified closer to retraining than the parent is


def test_all_explicit_replay_is_certified_to_round_off():
    p = problem("logreg", "gd")
    changes = _requests(p)[-2:]
    res = deltagrad_batched(p.model, p.traj, p.data, changes, DeltaGradConfig(period=1), batch_size=2)
    for b, ch in enumerate(changes):
        # retrain sums the retained rows, the replay all rows minus the deleted ones: round-off differs
        truth = relative_error(res.params[b], retrain(p.model, p.traj, p.data, ch), p.traj.final)
        assert truth <= float(res.error_estimate[b]) <= 1e-8


def test_estimate_does_not_depend_on_the_batch():
    p = problem("logreg", "gd")
    changes = _requests(p)
    whole = deltagrad_batched(p.model, p.traj, p.data, changes, batch_size=len(changes))
    parts = deltagrad_batched(p.model, p.traj, p.data, changes, batch_size=3)
    single = deltagrad(p.model, p.traj, p.data, changes[1])
    # the multi-secant model amplifies round-off (test_batched.py): agreement to 1e-4, where a lost
    # accumulator would change the estimate by O(1)
    torch.testing.assert_close(parts.error_estimate, whole.error_estimate, rtol=1e-4, atol=0)
    assert single.error_estimate == pytest.approx(float(whole.error_estimate[1]), rel=1e-4)
    assert single.diagnostics()["error_estimate"] == pytest.approx(single.error_estimate, rel=1e-3)


def test_select_and_concat_of_states_keep_the_accumulators():
    p = problem("logreg", "gd")
    changes = _requests(p)[:4]
    rp = Replay(p.model, p.traj, p.data, changes, DeltaGradConfig(curvature="own", period=10))
    seg = next(iter(p.traj.segments()))
    half = seg._replace(params=seg.params[:75], grads=seg.grads[:75], lrs=seg.lrs[:75])
    mid = rp.run_segment(rp.start(), half)
    assert bool((mid.err_open > 0).all()) and bool((mid.err_bound > 0).all()) and bool((mid.rate_last > 0).all())
    joined = ReplayState.concat([mid.select([0, 1]), mid.select([2, 3])])
    for name in ("err_bound", "err_open", "rate_last", "rate_prev", "roundoff_sq"):
        assert torch.equal(getattr(joined, name), getattr(mid, name)), name
    swapped = mid.select([3, 2, 1, 0])
    assert torch.equal(swapped.err_bound, mid.err_bound.flip(0))
    whole = rp.result(rp.run(mid))
    resumed = rp.result(rp.run(joined))
    assert torch.equal(whole.error_estimate, resumed.error_estimate)
    assert torch.equal(whole.error_estimate, rp.result(rp.run()).error_estimate)


def test_mlp_estimate_is_flagged_unreliable():
    p = problem("mlp", "gd")
    res = deltagrad(p.model, p.traj, p.data, make_change_set(p.data, delete_ids=random_ids(N, 8, seed=6),
                                                             n_classes=p.n_classes))
    assert not res.error_reliable and res.error_basis == BASIS_NONCONVEX
    assert res.diagnostics()["error_reliable"] is False


@pytest.mark.parametrize("kind,optimizer,settings", [("logreg", "gd", {}), ("logreg", "gd", {"curvature": "own"}),
                                                     ("linear", "sgd", {})])
def test_chain_drift_estimate_covers_the_drift_from_exact_retraining(kind, optimizer, settings):
    p = problem(kind, optimizer)
    ids = random_ids(N, 12, seed=11)
    res = deltagrad_online(p.model, p.traj, p.data, [ids[i:i + 1] for i in range(12)], DeltaGradConfig(**settings),
                           n_classes=p.n_classes)
    exact = retrain(p.model, p.traj, p.data, make_change_set(p.data, delete_ids=ids))
    truth_abs = float((res.params - exact).double().norm())
    truth = relative_error(res.params, exact, p.traj.final)
    assert truth_abs > 0
    assert res.error_absolute >= truth_abs and res.error_estimate >= truth
    if optimizer == "gd":  # measured: 100–140× the true drift, finite (SGD's bound is inf here: its slack)
        assert math.isfinite(res.error_estimate)


def test_drift_estimate_composes_versions():
    assert drift_estimate([1e-6, 2e-6], 1e-3) == pytest.approx((3e-6, 3e-6 / (1e-3 - 3e-6)))
    assert drift_estimate([1e-6, 2e-6], 1e-3, growth=2.0).absolute == pytest.approx(6e-6)
    assert drift_estimate([1e-3], 1e-3).ratio == math.inf


@pytest.mark.parametrize("args,kwargs,msg", [
    (([], 1.0), {}, "no versions given: drift_estimate needs the absolute estimate of at least one version"),
    (([1e-6, -1.0], 1.0), {}, r"absolute error estimates must be numbers >= 0, got -1.0"),
    (([float("nan")], 1.0), {}, r"absolute error estimates must be numbers >= 0, got nan"),
    (([1e-6], 1.0), {"growth": 0.5}, r"growth must be a finite number >= 1, got 0.5"),
    (([1e-6], -1.0), {}, r"moved must be a number >= 0, got -1.0"),
])
def test_drift_estimate_bad_input(args, kwargs, msg):
    with pytest.raises(InputError, match=msg):
        drift_estimate(*args, **kwargs)
