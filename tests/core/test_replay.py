"""DeltaGrad against exact retraining: the acceptance tests of the core.

Every comparison asserts ‖θ_DG − θ_exact‖ ≤ bound·‖θ_exact − θ_full‖, so a replay that did
nothing (θ_DG = θ_full, ratio 1) fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltagrad_ray.core import (Dataset, DeltaGradConfig, FunctionalModel, InMemory, Trajectory,
                                deltagrad, deltagrad_online, learning_rates, make_change_set,
                                relative_error, retrain, synthetic_classification, train)
from deltagrad_ray.core.replay import Replay
from deltagrad_ray.core.trajectory import MemoryRecorder

from .problems import N, problem, random_ids

# Convex models: the theory gives ‖w^I − w^U‖ = o(r/n) (Wu et al. 2020, Thm. 1); the issue asks
# for 5% of the deletion's effect.
CONVEX_BOUND = 0.05
# ReLU MLP: there is no such guarantee. The network is piecewise linear, so a deletion moves
# pre-activations across zero, which no curvature model captures: replacing the L-BFGS product
# by the exact Hessian-vector product gave no better ratio (0.50 on a 2-layer net, measured
# while building this). Gradient descent on the non-convex loss also amplifies differences
# (a 1e-5 perturbation of θ_0 grew ×26 over 300 steps). With SGD, the mini-batch Hessians add
# their own noise on top. Measured on this problem: GD 0.02–0.11, SGD 0.07–0.19 (smallest
# deletions worst). We require DeltaGrad to remove at least 85% (GD) / 70% (SGD) of the
# deletion's effect: a replay that did nothing fails by a factor 7 / 3.
MLP_BOUND = {"gd": 0.15, "sgd": 0.3}

CASES = [(k, o, c) for k in ("logreg", "linear", "mlp") for o in ("gd", "sgd")
         for c in ("delete-0.1%", "delete-1%", "add-0.5%")]


def _change(p, case: str):
    if case == "add-0.5%":
        return make_change_set(p.data, add=p.extra, n_classes=p.n_classes)
    k = N // 1000 if case == "delete-0.1%" else N // 100
    return make_change_set(p.data, delete_ids=random_ids(N, k, seed=7), n_classes=p.n_classes)


@pytest.mark.parametrize("kind,optimizer,case", CASES)
def test_deltagrad_matches_exact_retraining(kind, optimizer, case):
    p = problem(kind, optimizer)
    change = _change(p, case)
    res = deltagrad(p.model, p.traj, p.data, change)
    exact = retrain(p.model, p.traj, p.data, change)
    moved = float((exact - p.traj.final).norm())
    assert moved > 1e-6, "the change must move the model for the test to mean anything"
    ratio = relative_error(res.params, exact, p.traj.final)
    bound = MLP_BOUND[optimizer] if kind == "mlp" else CONVEX_BOUND
    assert ratio <= bound, f"{kind}/{optimizer}/{case}: error ratio {ratio:.4f} > {bound}"
    assert res.approx_steps > res.explicit_steps, "most steps must be approximate"


def test_delete_nothing_returns_cached_final_exactly():
    p = problem("logreg", "sgd")
    res = deltagrad(p.model, p.traj, p.data, make_change_set(p.data, delete_ids=torch.tensor([], dtype=torch.int64)))
    assert torch.equal(res.params, p.traj.final)
    assert res.explicit_steps == 0


@pytest.mark.parametrize("optimizer", ["gd", "sgd"])
def test_retrain_without_change_reproduces_recorded_run_bit_for_bit(optimizer):
    p = problem("mlp", optimizer)
    rec = MemoryRecorder(p.traj.steps, p.model.p, p.traj.dtype, "cpu")
    final = retrain(p.model, p.traj, p.data, make_change_set(p.data), recorder=rec)
    cached = p.traj.materialize()
    assert torch.equal(final, p.traj.final)
    assert torch.equal(rec.params, cached.params) and torch.equal(rec.grads, cached.grads)


def test_sgd_replay_reuses_cached_steps_until_first_changed_batch():
    # one deleted row touches one batch per epoch; before its first batch, the replay must be
    # bit-identical to the cache and take no explicit step
    p = problem("logreg", "sgd")
    change = make_change_set(p.data, delete_ids=torch.tensor([5]))
    res = deltagrad(p.model, p.traj, p.data, change, record=True)
    cached, replayed = p.traj.materialize(), res.trajectory.materialize()
    first = int(torch.nonzero((cached.params != replayed.params).any(dim=1))[0])
    assert first >= 1 and torch.equal(cached.params[:first], replayed.params[:first])


def test_online_twenty_deletions_stay_close_to_exact_retraining():
    p = problem("logreg", "gd")
    ids = random_ids(N, 20, seed=11)
    res = deltagrad_online(p.model, p.traj, p.data, [ids[i:i + 1] for i in range(20)],
                           n_classes=p.n_classes)
    exact = retrain(p.model, p.traj, p.data, make_change_set(p.data, delete_ids=ids))
    ratio = relative_error(res.params, exact, p.traj.final)
    assert ratio <= CONVEX_BOUND, f"online error ratio {ratio:.4f}"
    assert int(res.trajectory.removed.sum()) == 20
    with pytest.raises(ValueError, match="already deleted"):
        make_change_set(p.data, delete_ids=ids[:1], removed=res.trajectory.removed)


def test_online_sgd_deletions_stay_close_to_exact_retraining():
    p = problem("linear", "sgd")
    ids = random_ids(N, 10, seed=12)
    res = deltagrad_online(p.model, p.traj, p.data, [ids[:5], ids[5:]], n_classes=None)
    exact = retrain(p.model, p.traj, p.data, make_change_set(p.data, delete_ids=ids))
    assert relative_error(res.params, exact, p.traj.final) <= CONVEX_BOUND


def test_replay_leaves_the_cache_untouched():
    p = problem("logreg", "gd")
    before = p.traj.materialize()
    params, grads, final = before.params.clone(), before.grads.clone(), p.traj.final.clone()
    deltagrad(p.model, p.traj, p.data, make_change_set(p.data, delete_ids=torch.arange(50)))
    after = p.traj.materialize()
    assert torch.equal(after.params, params) and torch.equal(after.grads, grads)
    assert torch.equal(p.traj.final, final)


def test_segmented_replay_is_identical_to_whole_replay():
    p = problem("logreg", "sgd")
    whole = p.traj.materialize()
    chunked = Trajectory(p.traj.plan, p.traj.l2, p.traj.lrs, p.traj.initial, p.traj.final, p.traj.n_rows,
                         None, InMemory(whole.params, whole.grads, whole.lrs, chunk=7))
    change = make_change_set(p.data, delete_ids=torch.arange(0, 80))
    a = deltagrad(p.model, p.traj, p.data, change).params
    b = deltagrad(p.model, chunked, p.data, change).params
    assert torch.equal(a, b)


def test_float32_matches_exact_retraining():
    p = problem("logreg", "gd", torch.float32)
    change = make_change_set(p.data, delete_ids=random_ids(N, 80, seed=3))
    res = deltagrad(p.model, p.traj, p.data, change)
    assert res.params.dtype == torch.float32
    exact = retrain(p.model, p.traj, p.data, change)
    assert relative_error(res.params, exact, p.traj.final) <= CONVEX_BOUND


def test_geometric_schedule_matches_exact_retraining_with_fewer_explicit_steps():
    p = problem("logreg", "gd")
    change = _change(p, "delete-1%")
    exact = retrain(p.model, p.traj, p.data, change)
    uni = deltagrad(p.model, p.traj, p.data, change, DeltaGradConfig(period=5))
    geo = deltagrad(p.model, p.traj, p.data, change, DeltaGradConfig(schedule="geometric", burn_in=5))
    assert geo.explicit_steps < uni.explicit_steps
    assert relative_error(geo.params, exact, p.traj.final) <= CONVEX_BOUND


def test_custom_module_through_the_same_interface():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = FunctionalModel(Net().double(), lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"),
                            n_classes=3)
    data = synthetic_classification(3000, 6, 3, seed=4)
    traj = train(model, data, steps=200, lrs=learning_rates(200, 0.1), l2=0.01)
    assert torch.equal(traj.initial, model.init_params(dtype=torch.float64))  # starts at the module's init
    change = make_change_set(data, delete_ids=random_ids(3000, 30, seed=5), n_classes=3)
    res = deltagrad(model, traj, data, change)
    exact = retrain(model, traj, data, change)
    # smooth (tanh) network: no convexity guarantee, so the MLP bound applies
    assert relative_error(res.params, exact, traj.final) <= MLP_BOUND["gd"]


def test_batch_that_loses_all_its_rows_keeps_steps_aligned():
    # batches of 4 out of 40 rows: delete the 4 rows of step 3's batch
    data = synthetic_classification(40, 5, 3, seed=0)
    from deltagrad_ray.core import ModelSpec
    model = ModelSpec("logreg", 5, 3).build()
    traj = train(model, data, steps=60, lrs=learning_rates(60, 0.2), l2=0.05, batch_size=4, seed=1)
    lo, hi = traj.plan.batch_bounds(3)
    doomed = data.ids[traj.plan.permutation(0)[lo:hi]]
    change = make_change_set(data, delete_ids=doomed, n_classes=3)
    exact = retrain(model, traj, data, change)
    res = deltagrad(model, traj, data, change, DeltaGradConfig(period=1))  # all explicit: exact
    assert torch.allclose(res.params, exact, rtol=0, atol=1e-12)
    assert res.steps == traj.steps


def test_delete_then_add_back_returns_to_the_original_model():
    p = problem("logreg", "gd")
    ids = random_ids(N, 40, seed=21)
    change = make_change_set(p.data, delete_ids=ids)
    gone = deltagrad(p.model, p.traj, p.data, change, record=True)
    rows = p.data.rows(change.delete)
    back = make_change_set(p.data, add=Dataset(rows.X, rows.y, rows.ids + 10 * N),
                           removed=gone.trajectory.removed, n_classes=p.n_classes)
    # GD: re-adding the same rows (under new ids) restores the original objective exactly
    restored = deltagrad(p.model, gone.trajectory, p.data, back)
    moved = float((gone.params - p.traj.final).norm())
    assert float((restored.params - p.traj.final).norm()) <= CONVEX_BOUND * moved


def test_prediction_error_flags_a_poor_curvature_model_and_the_adaptive_schedule_fixes_it():
    # least squares whose Hessian has one outlying eigenvalue (the intercept, ≈1, against ≈0.1
    # for the 60 features): with m = 2 pairs, B = σI off their span under-estimates that
    # direction tenfold, and a uniform T0 = 5 replay is poor. The explicit steps see it (the
    # L-BFGS prediction is ~50% off); the adaptive schedule shortens the period there.
    from deltagrad_ray.core import ModelSpec, synthetic_regression
    data = synthetic_regression(4000, 60, seed=2)
    m = ModelSpec("linear", 60).build()
    traj = train(m, data, steps=150, lrs=learning_rates(150, 1.0), l2=0.05)
    change = make_change_set(data, delete_ids=torch.arange(40))
    exact = retrain(m, traj, data, change)
    # the compact L-BFGS model (m = 2) and the paper's period: where this problem's poor curvature shows
    uniform = deltagrad(m, traj, data, change, DeltaGradConfig(schedule="uniform", curvature="own", period=5))
    adaptive = deltagrad(m, traj, data, change, DeltaGradConfig(schedule="adaptive", curvature="own", period=5))
    assert relative_error(uniform.params, exact, traj.final) > 0.1 and uniform.prediction_error_mean > 0.3
    assert relative_error(adaptive.params, exact, traj.final) <= CONVEX_BOUND
    assert adaptive.explicit_steps < 2 * uniform.explicit_steps  # not just "everything explicit"


def test_gather_buffers_pass_between_gatherers_but_are_never_shared():
    """The gather buffer outlives its gatherer (the next replay or retraining in the process skips
    the first-touch page faults), yet two live gatherers never write into one buffer."""
    import gc

    import sys

    from deltagrad_ray.core.train import RowGather
    sys.modules[RowGather.__module__]._pool.pop((torch.float64, 7), None)  # no buffer left by an earlier test
    X = torch.randn(50, 7, dtype=torch.float64)
    rows_a, rows_b = torch.tensor([3, 1, 4, 1, 5]), torch.tensor([9, 2, 6, 5, 3])
    a, b = RowGather(X), RowGather(X)
    out_a, out_b = a(rows_a), b(rows_b)
    assert out_a.data_ptr() != out_b.data_ptr()
    assert torch.equal(out_a, X[rows_a]) and torch.equal(out_b, X[rows_b])
    ptr = out_a.data_ptr()
    del a, out_a
    gc.collect()
    c = RowGather(X)
    out_c = c(rows_b[:3])  # takes the collected gatherer's buffer (it is large enough)
    assert out_c.data_ptr() == ptr and torch.equal(out_c, X[rows_b[:3]])
    assert torch.equal(b(rows_a), X[rows_a])  # b's buffer is b's alone
    assert torch.equal(out_c, X[rows_b[:3]])
    # a gatherer of a few rows (a replay's changed rows) leaves a much larger pooled buffer (the
    # batches') to the gatherer that needs it: taking it cost the batch gatherer its page faults
    big = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:40]
    first = RowGather(X)
    ptr = first(big).data_ptr()
    del first
    gc.collect()
    small, large = RowGather(X), RowGather(X)
    assert small(rows_a[:2]).data_ptr() != ptr and large(big).data_ptr() == ptr


@pytest.mark.parametrize("kind,optimizer,curvature,dtype,limit", [
    ("logreg", "gd", "own", torch.float64, None), ("logreg", "sgd", "own", torch.float64, None),
    ("logreg", "gd", "secant", torch.float64, None), ("linear", "gd", "secant", torch.float64, None),
    ("logreg", "gd", "own+path", torch.float64, None),
    ("logreg", "sgd", "shared", torch.float64, None), ("mlp", "sgd", "own", torch.float64, None),
    ("logreg", "sgd", "own", torch.float32, None), ("logreg", "sgd", "own", torch.float64, 0.2)])
def test_single_request_fast_path_equals_the_batched_step(monkeypatch, kind, optimizer, curvature, dtype, limit):
    # One request's approximate steps take Replay._approximate_one, the batched step's arithmetic
    # without its batching; with it turned off the same replay takes _step throughout. Same guards,
    # same counters, the same parameters up to the summation order of a mat-vec (measured ≤ 1e-16
    # relative; bit-equal in float32 and where the product is the batched one), the same error
    # estimate. A known curvature bound ``limit`` below the true one makes the guard refuse some
    # steps, which the fast path hands back to _step.
    p = problem(kind, optimizer, dtype)
    ch = make_change_set(p.data, delete_ids=random_ids(N, 60, seed=7), add=p.extra.rows(torch.arange(5)),
                         n_classes=p.n_classes)
    cfg = DeltaGradConfig(curvature=curvature, max_curvature=limit)
    taken = []
    one = Replay._approximate_one

    def spy(self, *args):
        out = one(self, *args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(Replay, "_approximate_one", spy)
    fast = deltagrad(p.model, p.traj, p.data, ch, cfg)
    monkeypatch.setattr(Replay, "SINGLE_FAST_PATH", False)
    slow = deltagrad(p.model, p.traj, p.data, ch, cfg)
    assert sum(taken) == fast.approx_steps > 0  # every accepted approximate step came from the fast path
    if limit is not None:
        assert fast.fallbacks > 0 and not all(taken)
    got, want = fast.diagnostics(), slow.diagnostics()
    for k in ("error_estimate", "error_absolute"):  # None where the estimate does not hold (the MLP)
        g, w = got.pop(k), want.pop(k)
        assert (g is None and w is None) or g == pytest.approx(w, rel=1e-9)
    assert got == want  # step counts, fallbacks, prediction errors
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    moved = float((slow.params - p.traj.final).norm())
    diff = float((fast.params - slow.params).norm())
    assert diff <= tol * float(slow.params.norm()) and diff < 1e-3 * moved
