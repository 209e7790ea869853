"""B requests replayed together against a loop of single requests (B = 1), and the change-set generators.

One engine serves both, but a batch takes other kernels (one GEMM over the B parameter vectors
instead of the single request's GEMV, padded per-request rows, batched 2m × 2m solves) and must
keep the requests independent: each result must equal the request replayed alone.
"""

import pytest
import torch

from deltagrad_ray.core import (DeltaGradConfig, InputError, deltagrad, deltagrad_batched,
                                fold_assignment, k_fold, leave_one_out, make_change_set, random_subsets,
                                relative_error, retrain)
from deltagrad_ray.core.replay import LocalRows, Replay, _row_norms

from .problems import N, problem, random_ids


def _mixed(p):
    """LOO requests, a bulk deletion, an addition and a request that is both."""
    return (leave_one_out(p.data, p.data.ids[:6])
            + [make_change_set(p.data, delete_ids=random_ids(N, 80, seed=4), n_classes=p.n_classes),
               make_change_set(p.data, add=p.extra, n_classes=p.n_classes),
               make_change_set(p.data, delete_ids=torch.tensor([7, 70, 700]), add=p.extra.rows(torch.arange(5)),
                               n_classes=p.n_classes)])


@pytest.mark.parametrize("kind", ["logreg", "linear", "mlp"])
@pytest.mark.parametrize("optimizer", ["gd", "sgd"])
@pytest.mark.parametrize("schedule", ["uniform", "geometric", "adaptive"])
def test_batched_equals_looped_single_replays(kind, optimizer, schedule):
    p = problem(kind, optimizer)
    changes = _mixed(p)
    cfg = DeltaGradConfig(schedule=schedule)
    batched = deltagrad_batched(p.model, p.traj, p.data, changes, cfg, batch_size=4)
    for b, ch in enumerate(changes):
        single = deltagrad(p.model, p.traj, p.data, ch, cfg)
        # Same arithmetic, different summation order (a GEMM over B parameter vectors vs a
        # GEMV, batched vs single 2m×2m solves): rounding differs at ~1e-16 per step, and the
        # replay's dynamics contract such differences: measured ≤ 5e-16 with own pairs. The
        # multi-secant model (the default for GD logreg/linear) inverts its pairs' Gram matrix down
        # to singular values 1e-6 of the largest, which amplifies round-off up to ~1e6×: measured
        # ≤ 5e-11. 1e-9 still fails on any real discrepancy (the changes move the model by ~1e-3).
        rel = float((batched.params[b] - single.params).norm() / single.params.norm())
        assert rel <= 1e-9, f"request {b}: relative difference {rel:.2e}"
        got, want = batched.diagnostics(b), single.diagnostics()
        for k in ("prediction_error_max", "prediction_error_mean"):
            assert got.pop(k) == pytest.approx(want.pop(k), rel=1e-6, abs=1e-9)
        # The error estimate prices approximate steps by the measured ‖B·s − y‖: with own pairs batched
        # and single agree to ≤ 1e-11; the multi-secant model predicts a least-squares y to ~1e-8, so that
        # difference is itself near round-off and the estimates agree to ≤ 7e-6 (measured). A missing or
        # misplaced accumulator changes them by O(1).
        for k in ("error_estimate", "error_absolute"):
            assert float(getattr(batched, k)[b]) == pytest.approx(getattr(single, k), rel=1e-4, abs=1e-15)
            got.pop(k), want.pop(k)
        assert got == want


@pytest.mark.parametrize("optimizer", ["gd", "sgd"])
def test_single_request_step_tables_equal_the_padded_tables(optimizer):
    # B = 1 builds its rows without padding (a shortcut); beside an empty request the same request
    # takes the padded path, and with the other request empty its rows are not padded either: equal.
    p = problem("logreg", optimizer)
    ch = make_change_set(p.data, delete_ids=random_ids(N, 60, seed=5), add=p.extra.rows(torch.arange(7)),
                         n_classes=p.n_classes)
    empty = make_change_set(p.data, delete_ids=torch.tensor([], dtype=torch.int64), n_classes=p.n_classes)
    one = Replay(p.model, p.traj, p.data, [ch]).entries
    two = Replay(p.model, p.traj, p.data, [ch, empty]).entries
    seen = 0
    for t in range(p.traj.steps):
        a, b = one.at(t), two.at(t)
        for f in ("X", "y", "w", "changed", "delta"):
            assert torch.equal(getattr(a, f)[0], getattr(b, f)[0]), f"step {t}: {f}"
        assert (a.min_delta, a.any) == (int(b.delta[0]), b.any)
        seen += int(a.X.shape[1])
    assert seen > 0  # some step saw changed rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_off_units_of_a_segment_equal_per_step_norms(dtype):
    # the replay computes ‖w_t‖, ‖g_t‖ of a segment blockwise (bounded memory); each must be the
    # per-step float64 norm bit for bit, also when a block holds one row (p larger than a block)
    for k, p in ((9, 5), (3, (1 << 22) + 3), (0, 4)):
        x = torch.randn(k, p, dtype=dtype, generator=torch.Generator().manual_seed(k))
        want = torch.stack([row.double().norm() for row in x]) if k else torch.zeros(0, dtype=torch.float64)
        assert torch.equal(_row_norms(x), want)


def test_batched_float32_gemm_difference_form():
    p = problem("logreg", "gd")
    changes = leave_one_out(p.data, p.data.ids[:4]) + [
        make_change_set(p.data, delete_ids=random_ids(N, 80, seed=4), n_classes=p.n_classes)]
    lo = deltagrad_batched(p.model, p.traj, p.data, changes, gemm_dtype=torch.float32)
    for b, ch in enumerate(changes):
        single = deltagrad(p.model, p.traj, p.data, ch)
        exact = retrain(p.model, p.traj, p.data, ch)
        # float32 round-off on the differences X·(w_b − w_t) only: far below DeltaGrad's own error
        assert float((lo.params[b] - single.params).norm()) <= 1e-3 * float((exact - p.traj.final).norm())
        assert relative_error(lo.params[b], exact, p.traj.final) <= 0.05


def test_batched_replay_refuses_float32_gemm_for_autograd_models():
    p = problem("mlp", "gd")
    with pytest.raises(InputError, match="gemm_dtype applies to the linear models"):
        LocalRows(p.model, p.data, p.traj.plan.n_base, gemm_dtype=torch.float32)


def test_leave_one_out_and_k_fold_and_subsets():
    p = problem("logreg", "gd")
    loo = leave_one_out(p.data, torch.tensor([5, 9]))
    assert [c.delete.tolist() for c in loo] == [[5], [9]]
    folds = k_fold(p.data, 5, seed=1)
    rows = torch.cat([f.delete for f in folds])
    assert sorted(rows.tolist()) == list(range(N)) and max(len(f.delete) for f in folds) - min(
        len(f.delete) for f in folds) <= 1
    assert (fold_assignment(p.data, folds) >= 0).all()
    subs = random_subsets(p.data, 10, 3, seed=2)
    assert all(len(s.delete) == 10 and len(set(s.delete.tolist())) == 10 for s in subs)
    assert subs[0].delete.tolist() != subs[1].delete.tolist()


@pytest.mark.parametrize("call,msg", [
    (lambda d: k_fold(d, 1), r"K must be an integer with 2 <= K <= 8000 \(the number of ids\), got 1$"),
    (lambda d: k_fold(d, 8001), r"K must be an integer with 2 <= K <= 8000 \(the number of ids\), got 8001"),
    (lambda d: leave_one_out(d, torch.tensor([3, 123456])), r"unknown ids \(not in the data\): 123456"),
    (lambda d: random_subsets(d, 0, 3), r"subset size must be an integer in \[1, 7999\]"),
    (lambda d: leave_one_out(d, [3, 2**70]), r"ids must be integers in the int64 range"),
    (lambda d: leave_one_out(d, [3.0, 4.5]), r"ids must be integers, got torch.float32 values such as \[3.0, 4.5"),
    (lambda d: leave_one_out(d, []), r"no ids given"),
])
def test_generator_bad_input(call, msg):
    with pytest.raises(InputError, match=msg):
        call(problem("logreg", "gd").data)
