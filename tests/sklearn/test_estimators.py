"""The estimators' unlearning verbs against exact retraining, their inputs, caches and backends."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deltagrad_ray.core import InputError
from deltagrad_ray.sklearn import DeltaGradClassifier, DeltaGradRegressor

from ..processes import assert_same_across_processes


def ratio(dg, exact, full):
    """‖θ_DG − θ_exact‖ / ‖θ_exact − θ_full‖: DeltaGrad's error against the deletion's own effect."""
    return float((dg.params_ - exact.params_).norm() / (exact.params_ - full.params_).norm())


# Bounds as in the core's tests: convex models 0.05, the ReLU MLP 0.15 (README, Accuracy). The MLP
# cases train 80 steps at a fixed η, short of tol = 0.03 (ratios 0.04 and 0.18): their tol says that this
# test checks the replays, not convergence.
CASES = [("logreg", DeltaGradClassifier, dict(steps=80, lr=0.5), 0.05),
         ("linear", DeltaGradRegressor, dict(steps=80, lr=0.1), 0.05),
         ("mlp-c", DeltaGradClassifier, dict(model="mlp", hidden=(16,), steps=80, lr=0.3, tol=0.1), 0.15),
         ("mlp-r", DeltaGradRegressor, dict(model="mlp", hidden=(16,), steps=80, lr=0.05, tol=0.3), 0.15)]


def pinned(full, cls, kw, X, y, keep):
    """A fresh fit on rows ``keep`` with ``full``'s scaling, η and T pinned: what exact retraining must equal."""
    Z = (X[keep] - full.x_mean_) / full.x_scale_
    t = (y[keep] - full.y_mean_) / full.y_scale_ if cls is DeltaGradRegressor else y[keep]
    return cls(**{**kw, "standardize": False, "lr": full.lr_, "steps": full.n_iter_}).fit(Z, t)


@pytest.mark.parametrize("name, cls, kw, bound", CASES, ids=[c[0] for c in CASES])
def test_forget_against_exact_retraining(name, cls, kw, bound, breast_cancer, diabetes):
    X, y = breast_cancer if cls is DeltaGradClassifier else diabetes
    full = cls(**kw).fit(X, y)
    rows = [3, 14, 15, 92, 65]
    dg, exact = full.forget(rows), full.forget(rows, exact=True)
    assert float((exact.params_ - full.params_).norm()) > 1e-4       # the deletion moves the model
    assert ratio(dg, exact, full) < bound
    assert dg.forget_report_["explicit_steps"] < kw["steps"]           # approximate steps were taken
    # exact retraining equals a fresh fit on the remaining rows under the scaling fixed at fit time
    # (GD: same θ_0, steps, learning rates); forgetting does not rescale
    keep = np.setdiff1d(np.arange(len(X)), rows)
    assert torch.allclose(exact.params_, pinned(full, cls, kw, X, y, keep).params_, rtol=0, atol=1e-9)
    assert exact.x_mean_ is full.x_mean_ and dg.x_scale_ is full.x_scale_
    # without standardisation, a plain fresh fit on the remaining rows is the same thing (targets scaled
    # by hand: the MLP at η = 0.05 diverges on diabetes' raw targets, ~150)
    yr = (y - y.mean()) / y.std() if cls is DeltaGradRegressor else y
    raw = cls(**kw, standardize=False).fit(X, yr)
    fresh = cls(**kw, standardize=False).fit(X[keep], yr[keep])
    assert torch.allclose(raw.forget(rows, exact=True).params_, fresh.params_, rtol=0, atol=1e-9)
    # the original is untouched
    assert torch.equal(full.params_, cls(**kw).fit(X, y).params_)


def test_forget_again_follows_exact_retraining(breast_cancer):
    X, y = breast_cancer
    full = DeltaGradClassifier(steps=80, lr=0.5).fit(X, y)
    dg = full.forget([1, 2]).forget([7, 8, 9])
    exact = full.forget([1, 2], exact=True).forget([7, 8, 9], exact=True)
    assert ratio(dg, exact, full) < 0.05
    with pytest.raises(InputError, match=r"ids already deleted from this trajectory: 2"):
        dg.forget([2])


def test_forget_many_equals_single_requests(diabetes):
    X, y = diabetes
    full = DeltaGradRegressor(steps=80, lr=0.1).fit(X, y)
    sets = [[0], [5, 6], [10, 11, 12], [400]]
    many = full.forget_many(sets, batch_size=3)
    for s, m in zip(sets, many):
        single = full.forget(s)
        assert torch.allclose(m.params_, single.params_, rtol=0, atol=1e-10)
        assert ratio(m, full.forget(s, exact=True), full) < 0.05
    exact = full.forget_many(sets, exact=True)
    assert torch.allclose(exact[1].params_, full.forget([5, 6], exact=True).params_, atol=1e-12)
    with pytest.raises(InputError, match="holds no trajectory to replay"):
        many[0].forget([1])


def test_forget_many_verify_states_a_bound_that_holds_for_all_copies(breast_cancer):
    """verify=K retrains K of the sets exactly; the statement is checked against every set retrained
    exactly (exact=True)."""
    X, y = breast_cancer
    full = DeltaGradClassifier(steps=80, lr=0.5).fit(X[:150], y[:150])
    sets = [[i] for i in range(120)]
    ours = full.forget_many(sets, verify=59, random_state=2)
    truth = full.forget_many(sets, exact=True)
    assert isinstance(ours, list) and len(ours) == 120 and truth.verification is None
    v = ours.verification
    assert v.sampled == 59 and v.population == 120 and v.bound is not None and v.confidence >= 0.95
    P = torch.stack([m.params_ for m in ours]).double()
    E = torch.stack([m.params_ for m in truth]).double()
    err = (P - E).norm(dim=1) / (E - full.params_.double()).norm(dim=1)
    assert torch.allclose(torch.tensor(v.errors, dtype=err.dtype), err[list(v.indices)], rtol=1e-6, atol=1e-12)
    assert float((err <= v.bound).double().mean()) >= v.quantile
    assert 0 < v.max_error < 0.5                                # the replays are not the exact refits, yet close
    with pytest.raises(InputError, match="verify"):
        full.forget_many(sets, verify=0)


def test_loo_predict_bounded_chunks(wine):
    X, y = wine
    clf = DeltaGradClassifier(steps=60, lr=0.5).fit(X, np.array(["a", "b", "c"])[y])
    Xq = X[:9]
    labels = clf.loo_predict(Xq, chunk=50)
    proba = clf.loo_predict(Xq, proba=True, chunk=7)
    assert labels.shape == (len(X), 9) and proba.shape == (len(X), 9, 3)
    assert set(np.unique(labels)) <= {"a", "b", "c"}
    assert (clf.classes_[proba.argmax(-1)] == labels).all()   # chunking does not change the models
    exact = clf.loo_predict(Xq, proba=True, exact=True, chunk=200)
    full = clf.predict_proba(Xq)
    err, effect = np.abs(proba - exact).max(), np.abs(exact - full[None]).max()
    assert effect > 1e-4 and err < 0.05 * effect
    # row i comes from the model without training row i
    assert np.allclose(proba[17], clf.forget([17]).predict_proba(Xq), atol=1e-10)


def test_regressor_loo_predict(diabetes):
    X, y = diabetes
    reg = DeltaGradRegressor(steps=60, lr=0.1).fit(X[:120], y[:120])
    loo = reg.loo_predict(X[120:130], chunk=32)
    exact = reg.loo_predict(X[120:130], exact=True)
    assert loo.shape == (120, 10)
    effect = np.abs(exact - reg.predict(X[120:130])[None]).max()
    assert effect > 1e-3 and np.abs(loo - exact).max() < 0.05 * effect
    after = reg.forget([0, 1])
    assert after.loo_predict(X[120:122]).shape == (118, 2)


def test_labels_of_any_type_and_binary(breast_cancer):
    X, y = breast_cancer
    names = np.array(["malignant", "benign"])[y]
    clf = DeltaGradClassifier(steps=60, lr=0.5).fit(X, names)
    assert list(clf.classes_) == ["benign", "malignant"]
    assert clf.score(X, names) > 0.95
    assert clf.coef_.shape == (2, 30) and clf.intercept_.shape == (2,)
    assert set(clf.forget([0]).predict(X[:20])) <= {"benign", "malignant"}


def test_inputs_in_every_form(tmp_path, diabetes):
    X, y = diabetes
    ref = DeltaGradRegressor(steps=30).fit(X, y)
    df = pd.DataFrame(X, columns=[f"x{j}" for j in range(10)])
    by_df = DeltaGradRegressor(steps=30).fit(df, y)
    assert list(by_df.feature_names_in_) == list(df.columns)
    table = pa.table({"label": y, "features": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), 10)})
    pq.write_table(table, tmp_path / "train.parquet")
    for model in (by_df, DeltaGradRegressor(steps=30).fit(table),
                  DeltaGradRegressor(steps=30).fit(str(tmp_path / "train.parquet"))):
        assert torch.equal(model.params_, ref.params_)
    assert np.array_equal(ref.predict(table), ref.predict(X))


def test_bad_input_names_row_and_column(diabetes):
    X, y = diabetes
    df = pd.DataFrame(X.copy(), columns=[f"x{j}" for j in range(10)])
    df.iloc[7, 3] = np.nan
    with pytest.raises(InputError, match=r"X: NaN in row 7, column 3 \('x3'\)"):
        DeltaGradRegressor().fit(df, y)
    yy = y.copy()
    yy[5] = np.inf
    with pytest.raises(ValueError, match=r"Input y contains inf in row 5"):
        DeltaGradRegressor().fit(X, yy)
    reg = DeltaGradRegressor().fit(X, y)
    Xb = X[:4].copy()
    Xb[2, 9] = -np.inf
    with pytest.raises(InputError, match=r"X: -inf in row 2, column 9"):
        reg.predict(Xb)
    with pytest.raises(InputError, match=r"indices: row 442 is out of range; the training data has 442 rows"):
        reg.forget([1, 442])
    with pytest.raises(InputError, match="index set 1: no rows given"):
        reg.forget_many([[1], []])
    with pytest.raises(InputError, match="model must be one of linear, mlp, got 'logreg'"):
        DeltaGradRegressor("logreg").fit(X, y)
    with pytest.raises(InputError, match="unknown DeltaGrad setting 'periodd'"):
        DeltaGradRegressor(config={"periodd": 3}).fit(X, y)
    with pytest.raises(InputError, match="backend 'ray' runs on caches: fit the estimator with cache="):
        reg.forget_many([[1]], backend="ray")
    with pytest.raises(InputError, match=r"training diverged (at|by) step \d+: .* \(lr / --lr; η was 5"):
        DeltaGradRegressor(lr=5.0, steps=400).fit(X, y)


def test_deltagrad_settings_are_used(breast_cancer):
    X, y = breast_cancer
    from deltagrad_ray import DeltaGradConfig
    a = DeltaGradClassifier(steps=60, lr=0.5, config=DeltaGradConfig(period=2)).fit(X, y).forget([4])
    b = DeltaGradClassifier(steps=60, lr=0.5, config={"period": 20}).fit(X, y).forget([4])
    assert a.forget_report_["explicit_steps"] > b.forget_report_["explicit_steps"]


def test_cache_backed_estimator(tmp_path, breast_cancer):
    X, y = breast_cancer
    kw = dict(steps=60, lr=0.5)
    mem = DeltaGradClassifier(**kw).fit(X, y)
    cached = DeltaGradClassifier(**kw, cache=str(tmp_path / "c1")).fit(X, y)
    assert (tmp_path / "c1" / "manifest.json").exists() and (tmp_path / "c1" / "data" / "part-0.parquet").exists()
    assert torch.allclose(cached.params_, mem.params_, atol=1e-12)
    dg = cached.forget([3, 4], out_cache=str(tmp_path / "c2"))
    assert torch.allclose(dg.params_, mem.forget([3, 4]).params_, atol=1e-10)
    again = dg.forget([5])                                   # the derived cache replays again
    assert ratio(again, mem.forget([3, 4], exact=True).forget([5], exact=True), mem) < 0.05
    with pytest.raises(InputError, match="holds no trajectory to replay"):
        cached.forget([1]).forget([2])
    many = cached.forget_many([[1], [2, 3]])
    assert torch.allclose(many[1].params_, mem.forget([2, 3]).params_, atol=1e-10)
    loo = cached.loo_predict(X[:3], proba=True, chunk=300)
    assert np.allclose(loo, mem.loo_predict(X[:3], proba=True), atol=1e-10)
    with pytest.raises(Exception, match="a trajectory cache already exists here"):
        DeltaGradClassifier(**kw, cache=str(tmp_path / "c1")).fit(X, y)


def test_forget_many_on_ray_equals_serial(ray_cluster, tmp_path, diabetes):
    X, y = diabetes
    reg = DeltaGradRegressor(steps=40, cache=str(tmp_path / "c")).fit(X, y)
    sets = [[i] for i in range(6)] + [[10, 20, 30]]
    from deltagrad_ray.distributed.backends import RayBackend
    on_ray = reg.forget_many(sets, backend=RayBackend(workers=2), batch_size=2)
    serial = reg.forget_many(sets, batch_size=2)
    for a, b in zip(on_ray, serial):  # Ray workers are other processes (tests/processes.py)
        assert_same_across_processes(a.params_, b.params_)


def test_auto_learning_rate_is_one_over_the_smoothness(diabetes):
    X, y = diabetes                                              # standardised already: L of these rows
    Xt = np.hstack([X, np.ones((len(X), 1))])
    L = np.linalg.eigvalsh(Xt.T @ Xt / len(X)).max() + 1e-3
    reg = DeltaGradRegressor().fit(X * 100, y)                   # features in other units: the same η, the same fit
    assert reg.lr_ == pytest.approx(1 / L, rel=1e-3)
    assert np.allclose(reg.predict(X * 100), DeltaGradRegressor().fit(X, y).predict(X), rtol=1e-9)
    raw = DeltaGradRegressor(steps=100, standardize=False).fit(X * 100, y)   # unscaled: still stable
    assert raw.lr_ == pytest.approx(1 / (L * 1e4), rel=1e-3)
    assert DeltaGradRegressor().fit(X, y).score(X, y) > 0.5
    clf = DeltaGradClassifier().fit(X, y > 140)
    assert clf.lr_ == pytest.approx(1 / (0.5 * (L - 1e-3) + 1e-3), rel=1e-3)
    with pytest.raises(InputError, match="lr must be a number > 0 or 'auto', got 'fast'"):
        DeltaGradRegressor(lr="fast").fit(X, y)
