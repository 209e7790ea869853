"""Sampled exact verification: the order-statistic rule, and its statement checked against exact
retraining of every request of a leave-one-out run."""

from __future__ import annotations

import pytest
import torch

from deltagrad_ray import api, many
from deltagrad_ray.core import InputError, synthetic_classification
from deltagrad_ray.core.replay import retrain_batched
from deltagrad_ray.core.requests import leave_one_out
from deltagrad_ray.stats.verification import binom_cdf, draw, order_statistic


def test_the_order_statistic_rule():
    m, c = order_statistic(59, 0.95, 0.95)                  # the classic: the maximum of 59 draws
    assert m == 59 and c == pytest.approx(1 - 0.95 ** 59) and c >= 0.95
    assert order_statistic(58, 0.95, 0.95)[0] is None          # 58 are too few for the maximum
    m, c = order_statistic(200, 0.95, 0.95)
    assert m < 200 and c >= 0.95 and binom_cdf(m - 2, 200, 0.95) < 0.95   # the smallest such order
    assert binom_cdf(3, 3, 0.5) == 1.0 and binom_cdf(0, 2, 0.5) == pytest.approx(0.25)
    idx = draw(100, 10, seed=3)
    assert len(set(idx.tolist())) == 10 and torch.equal(idx, draw(100, 10, seed=3))


def test_loo_verify_states_a_bound_that_holds_for_all_requests(tmp_path):
    data = synthetic_classification(250, 6, 3, seed=0)
    api.fit(data, str(tmp_path / "c"), steps=60, lr=0.5, l2=0.01)
    res = many.loo(str(tmp_path / "c"), verify=80, quantile=0.9, confidence=0.95, seed=1)
    v = res.verification
    assert v.sampled == 80 and v.population == 250 and v.bound is not None and v.confidence >= 0.95
    assert "with probability >= " in v.statement()
    # the truth: every request retrained exactly
    from deltagrad_ray.store import open_cache
    c = open_cache(tmp_path / "c")
    ds = c.data()
    exact = retrain_batched(c.model, c.trajectory(), ds, leave_one_out(ds, res.ids))
    moved = (exact - c.final).norm(dim=1)
    err = (res.params - exact).norm(dim=1) / moved
    # the drawn errors are the true ones, and the bound covers at least the stated fraction
    assert torch.allclose(torch.tensor(v.errors, dtype=err.dtype), err[list(v.indices)], rtol=1e-6, atol=1e-12)
    assert float((err <= v.bound).double().mean()) >= v.quantile
    assert v.max_error < 0.5 and v.max_error > 0                     # DeltaGrad did something, not nothing


def test_bad_verify_settings_are_refused_before_any_replay(tmp_path):
    data = synthetic_classification(100, 4, 2, seed=0)
    api.fit(data, str(tmp_path / "c"), steps=10, lr=0.5)
    for bad, word in ((0, "verify"), (2.5, "verify"), (True, "verify")):
        with pytest.raises(InputError, match=word):
            many.loo(str(tmp_path / "c"), verify=bad)
    with pytest.raises(InputError, match="confidence"):
        many.loo(str(tmp_path / "c"), verify=5, confidence=1.0)


def test_the_cli_prints_the_statement(tmp_path, capsys):
    from deltagrad_ray.cli import main
    api.fit(synthetic_classification(120, 4, 2, seed=0), str(tmp_path / "c"), steps=30, lr=0.5, l2=0.01)
    capsys.readouterr()
    code = main(["loo", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "loo.parquet"), "--verify", "59"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "at least 95% of all 120 requests have error <= " in out and "59 retrained exactly" in out
    with pytest.raises(SystemExit) as e:   # a usage error: argparse's one line, exit 2
        main(["loo", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "x.parquet"), "--verify", "0"])
    assert e.value.code == 2 and "argument --verify: must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["jackknife+", "cv+"])
def test_conformal_verify_states_a_bound_that_holds_for_all_its_models(tmp_path, method):
    """The models behind the intervals (one per left-out point, or one per fold) are verified as
    loo's are: the drawn errors are the true ones and the bound covers the stated fraction of ALL
    models, each retrained exactly here."""
    from deltagrad_ray.core import synthetic_regression
    from deltagrad_ray.core.requests import k_fold
    from deltagrad_ray.store import open_cache
    data = synthetic_regression(240, 5, seed=2)
    api.fit(data, str(tmp_path / "c"), model="linear", steps=60, lr=0.1, l2=0.01)
    test = synthetic_regression(40, 5, seed=3)
    k = 30 if method == "jackknife+" else 8
    res = many.conformal(str(tmp_path / "c"), test, 0.1, method=method, folds=12, verify=k, quantile=0.9,
                         confidence=0.5, seed=4)
    v = res.verification
    assert v.sampled == k and v.population == res.n_models and v.bound is not None
    c = open_cache(tmp_path / "c")
    ds = c.data()
    changes = leave_one_out(ds, None) if method == "jackknife+" else k_fold(ds, 12, seed=4)
    exact = retrain_batched(c.model, c.trajectory(), ds, changes)
    models = res.replay.models.rows(torch.arange(res.n_models)).to(exact.dtype)
    err = (models - exact).norm(dim=1) / (exact - c.final).norm(dim=1)
    assert torch.allclose(torch.tensor(v.errors, dtype=err.dtype), err[list(v.indices)], rtol=1e-6, atol=1e-12)
    assert float((err <= v.bound).double().mean()) >= v.quantile
    assert 0 < v.max_error < 0.5                                       # DeltaGrad did something, not nothing
    assert res.summary()["verification"]["sampled"] == k


def test_the_conformal_cli_prints_the_statement(tmp_path, capsys):
    from deltagrad_ray.cli import main
    from deltagrad_ray.core import synthetic_regression
    api.fit(synthetic_regression(120, 4, seed=0), str(tmp_path / "c"), model="linear", steps=30, lr=0.1, l2=0.01)
    api.write_dataset(synthetic_regression(20, 4, seed=1), str(tmp_path / "test.parquet"))
    capsys.readouterr()
    code = main(["conformal", "--cache", str(tmp_path / "c"), "--test", str(tmp_path / "test.parquet"),
                 "--out", str(tmp_path / "conformal.parquet"), "--verify", "59"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "at least 95% of all 120 requests have error <= " in out and "59 retrained exactly" in out


@pytest.mark.parametrize(("kind", "optimizer"), [("logreg", "gd"), ("logreg", "sgd"), ("linear", "gd"), ("mlp", "gd")])
def test_the_guarantee_holds_at_its_rate_over_repeated_draws(kind, optimizer):
    """The rule's promise, checked as a rate: over 300 independent draws of K = 59 of 120 leave-one-out
    requests, the stated bound covers at least 95% of ALL requests in at least 95% of the draws (the
    true errors of all 120 from exact retraining), on GD and SGD, logistic, least squares and MLP."""
    from deltagrad_ray.core import DeltaGradConfig, deltagrad_batched
    from deltagrad_ray.stats.verification import verification
    from tests.core.problems import problem, random_ids
    pb = problem(kind, optimizer)
    ids = pb.data.ids[random_ids(len(pb.data), 120, seed=5)]
    changes = leave_one_out(pb.data, ids)
    dg = deltagrad_batched(pb.model, pb.traj, pb.data, changes, DeltaGradConfig(), batch_size=60).params
    exact = retrain_batched(pb.model, pb.traj, pb.data, changes)
    err = (dg - exact).double().norm(dim=1) / (exact - pb.traj.final).double().norm(dim=1)
    assert float(err.max()) > 1e-12 and float(err.max()) > float(err.min())   # errors to bound, not all alike
    held = []
    for seed in range(300):
        idx = draw(120, 59, seed)
        v = verification(dg[idx], exact[idx], pb.traj.final, idx, 120, quantile=0.95, confidence=0.95)
        held.append(float((err <= v.bound).double().mean()) >= 0.95)
    assert sum(held) / len(held) >= 0.95, sum(held)
