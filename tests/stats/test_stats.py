"""Jackknife, influence and conformal prediction from DeltaGrad LOO models, against exact LOO refits."""

from __future__ import annotations

import functools

import pytest
import torch

from deltagrad_ray import api, many
from deltagrad_ray.core import InputError
from deltagrad_ray.datasets import sklearn_dataset, train_test_split
from deltagrad_ray.stats import jackknife, jackknife_plus_intervals, jackknife_plus_sets, predict
from deltagrad_ray.store import write_dataset

EXACT = many.Fanout(backend=many.ExactBackend())


# -- the pure functions ---------------------------------------------------------------------------
def test_jackknife_of_the_mean_is_the_textbook_one():
    x = torch.tensor([1.0, 2.0, 4.0, 7.0, 11.0], dtype=torch.float64)
    loo = torch.stack([torch.cat([x[:i], x[i + 1:]]).mean() for i in range(5)])
    jk = jackknife(x.mean(), loo)
    assert torch.isclose(jk.se, x.std() / 5 ** 0.5) and torch.isclose(jk.bias_corrected, x.mean())


def test_jackknife_removes_the_bias_of_the_plug_in_variance():
    x = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plug = lambda v: ((v - v.mean()) ** 2).mean()
    loo = torch.stack([plug(torch.cat([x[:i], x[i + 1:]])) for i in range(30)])
    assert torch.isclose(jackknife(plug(x), loo).bias_corrected, x.var(), rtol=1e-12)


def test_jackknife_plus_quantiles_follow_barber_et_al():
    # n = 9, α = 0.2: lower = ⌊0.2·10⌋ = 2nd smallest of μ − R; upper = ⌈0.8·10⌉ = 8th smallest of μ + R
    mu_train = torch.zeros(9, dtype=torch.float64)
    y = torch.arange(1.0, 10.0, dtype=torch.float64)                   # R_i = i
    mu_test = torch.zeros(9, 1, dtype=torch.float64)
    lo, hi = jackknife_plus_intervals(mu_train, y, mu_test, 0.2)
    assert float(lo) == -8.0 and float(hi) == 8.0
    lo, hi = jackknife_plus_intervals(mu_train, y, mu_test, 0.05)     # ⌈0.95·10⌉ = 10 > n
    assert float(lo) == -float("inf") and float(hi) == float("inf")


def test_conformal_sets_contain_every_label_at_tiny_alpha():
    p = torch.full((20, 3), 1 / 3, dtype=torch.float64)
    sets = jackknife_plus_sets(p, torch.zeros(20, dtype=torch.int64), p[:, None, :].expand(20, 4, 3), 0.01)
    assert sets.all()


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, float("nan")])
def test_alpha_outside_the_unit_interval(alpha):
    with pytest.raises(InputError, match=r"alpha must be in \(0, 1\)"):
        jackknife_plus_intervals(torch.zeros(3), torch.zeros(3), torch.zeros(3, 1), alpha)


# -- against exact leave-one-out refits ------------------------------------------------------------
# η well inside the stability region (η·L ≈ 0.4 on diabetes): see README, "Accuracy"
SETUPS = {"diabetes": dict(model="linear", steps=200, lr=0.1, l2=0.001),
          "breast_cancer": dict(model="logreg", steps=200, lr=0.5, l2=0.001)}


@functools.cache
def _world(name: str, tmp: str, seed: int = 0, n_train: int = 300):
    tr, te = train_test_split(sklearn_dataset(name), n_train, seed=seed)
    write_dataset(tr, f"{tmp}/{name}-{seed}-train.parquet", overwrite=True)
    write_dataset(te, f"{tmp}/{name}-{seed}-test.parquet", overwrite=True)
    cache = api.fit(f"{tmp}/{name}-{seed}-train.parquet", f"{tmp}/{name}-{seed}-cache", **SETUPS[name])
    return cache, te, f"{tmp}/{name}-{seed}-test.parquet"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("stats"))


def test_jackknife_plus_intervals_agree_with_exact_loo(tmp):
    cache, te, test_uri = _world("diabetes", tmp)
    dg = many.conformal(cache, test_uri, 0.1, fanout=many.Fanout(batch_size=64))
    ex = many.conformal(cache, test_uri, 0.1, fanout=EXACT)
    width = ex["upper"] - ex["lower"]
    rel = torch.maximum((dg["lower"] - ex["lower"]).abs(), (dg["upper"] - ex["upper"]).abs()) / width
    # reported in the README: the largest end-point difference relative to the interval width
    print(f"diabetes jackknife+: max end-point difference / width = {float(rel.max()):.2e}")
    assert float(rel.max()) <= 0.01


@pytest.mark.parametrize("method", ["jackknife+", "cv+"])
def test_the_endpoint_bound_holds_against_exact_refits(tmp, method):
    """Each end point is within the stated bound of the exact refits' end point, and the bound says
    something (far below the interval width)."""
    cache, te, test_uri = _world("diabetes", tmp)
    dg = many.conformal(cache, test_uri, 0.1, method=method, folds=10, fanout=many.Fanout(batch_size=64))
    ex = many.conformal(cache, test_uri, 0.1, method=method, folds=10, fanout=EXACT)
    shift = torch.maximum((dg["lower"] - ex["lower"]).abs(), (dg["upper"] - ex["upper"]).abs())
    bound = dg["endpoint_bound"]
    assert bound.shape == shift.shape and bool((shift <= bound).all())
    width = ex["upper"] - ex["lower"]
    print(f"diabetes {method}: largest end-point bound / width = {float((bound / width).max()):.2e}, "
          f"measured shift / bound at most {float((shift / bound).max()):.2e}")
    assert float((bound / width).max()) < 0.1
    assert "endpoint_bound" not in ex or float(ex["endpoint_bound"].max()) == 0.0   # exact refits: no shift


def test_cv_plus_intervals_agree_with_exact_k_fold(tmp):
    cache, te, test_uri = _world("diabetes", tmp)
    dg = many.conformal(cache, test_uri, 0.1, method="cv+", folds=10)
    ex = many.conformal(cache, test_uri, 0.1, method="cv+", folds=10, fanout=EXACT)
    rel = (dg["upper"] - ex["upper"]).abs().max() / (ex["upper"] - ex["lower"]).min()
    print(f"diabetes CV+: max end-point difference / width = {float(rel):.2e}")
    assert float(rel) <= 0.01


def test_conformal_sets_agree_with_exact_loo(tmp):
    cache, te, test_uri = _world("breast_cancer", tmp)
    dg = many.conformal(cache, test_uri, 0.1, fanout=many.Fanout(batch_size=64))
    ex = many.conformal(cache, test_uri, 0.1, fanout=EXACT)
    same = (dg["sets"] == ex["sets"]).all(dim=1).double().mean()
    print(f"breast_cancer jackknife+ sets: fraction identical = {float(same):.4f}")
    assert float(same) >= 0.98


@pytest.mark.parametrize("method", ["jackknife+"])
def test_certain_sets_are_the_exact_refits_sets(tmp, method):
    """Every set marked certain equals the exact refits' set, and most are certain; a replay that did
    nothing (the full model for every request, estimate 0) would mark wrong sets certain. (CV+: the
    fold models' errors are larger and the worst-case bound certifies no set on this data: 0 of 269.)"""
    cache, te, test_uri = _world("breast_cancer", tmp)
    dg = many.conformal(cache, test_uri, 0.1, method=method, folds=10, fanout=many.Fanout(batch_size=64))
    ex = many.conformal(cache, test_uri, 0.1, method=method, folds=10, fanout=EXACT)
    certain = dg["set_certain"]
    same = (dg["sets"] == ex["sets"]).all(dim=1)
    print(f"breast_cancer {method}: sets certain {float(certain.double().mean()):.3f}, "
          f"identical {float(same.double().mean()):.3f}")
    assert bool(same[certain].all())
    assert float(certain.double().mean()) >= 0.5
    assert dg.metadata()["sets_certain"] == pytest.approx(float(certain.double().mean()), abs=1e-3)


def test_the_softmax_score_bound():
    """|p_y(θ') − p_y(θ)| ≤ √2/4·‖(x, 1)‖·‖θ' − θ‖ for a linear softmax model, on random draws."""
    from deltagrad_ray.core import ModelSpec
    from deltagrad_ray.stats.conformal import SOFTMAX_LIPSCHITZ
    g = torch.Generator().manual_seed(0)
    fm = ModelSpec("logreg", 6, 4).build()
    worst = 0.0
    for _ in range(200):
        th, x = torch.randn(fm.p, generator=g, dtype=torch.float64) * 3, torch.randn(1, 6, generator=g,
                                                                                       dtype=torch.float64) * 2
        dth = torch.randn(fm.p, generator=g, dtype=torch.float64) * 1e-3
        p0, p1 = predict(fm, th[None], x)[0], predict(fm, (th + dth)[None], x)[0]
        ratio = float((p1 - p0).abs().max()) / (float((x.pow(2).sum() + 1).sqrt()) * float(dth.norm()))
        worst = max(worst, ratio)
    assert worst <= SOFTMAX_LIPSCHITZ and worst > 0.1 * SOFTMAX_LIPSCHITZ   # holds, and is not vacuous


def test_jackknife_and_influence_agree_with_exact_loo(tmp):
    cache, te, test_uri = _world("breast_cancer", tmp)
    ids = cache.data().ids[:60]
    dg = many.jackknife(cache, test_uri, ids)
    ex = many.jackknife(cache, test_uri, ids, fanout=EXACT)
    assert torch.allclose(dg["test_loss"].se, ex["test_loss"].se, rtol=0.02)
    assert torch.allclose(dg["predictions"].se, ex["predictions"].se, rtol=0.05, atol=1e-6)
    # and the jackknife must see the leave-one-out spread: a no-op replay would give se = 0
    assert float(ex["test_loss"].se) > 0
    idg = many.influence(cache, test_uri, ids)["influence"]
    iex = many.influence(cache, test_uri, ids, fanout=EXACT)["influence"]
    assert float((idg - iex).abs().max()) <= 0.05 * float(iex.abs().max())
    assert float(torch.corrcoef(torch.stack([idg, iex]))[0, 1]) > 0.99


# -- coverage, statistically -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["diabetes", "breast_cancer"])
def test_coverage_over_repeated_splits(tmp, name):
    """Mean coverage over R random splits must not be significantly below 1 − α.

    Jackknife+ guarantees 1 − 2α and gives ≈ 1 − α in practice (Barber et al. 2021). Coverage
    of different test points in one split is correlated, so the test uses the split-to-split
    variation: it fails when c̄ < 1 − α − z·sd(c)/√R with z = 2.33 (a one-sided test at the 1%
    level; a margin of about 0.01-0.02 here)."""
    alpha, R = 0.1, 12
    cov = []
    for seed in range(R):
        cache, te, test_uri = _world(name, tmp, seed=100 + seed, n_train=250)
        out = many.conformal(cache, test_uri, alpha, fanout=many.Fanout(batch_size=128))
        if name == "diabetes":
            hit = (te.y >= out["lower"]) & (te.y <= out["upper"])
        else:
            hit = out["sets"][torch.arange(len(te)), te.y]
        cov.append(float(hit.double().mean()))
    c = torch.tensor(cov, dtype=torch.float64)
    margin = 2.33 * float(c.std()) / R ** 0.5
    print(f"{name}: coverage {float(c.mean()):.4f} ± {float(c.std()):.4f} over {R} splits (margin {margin:.4f})")
    assert float(c.mean()) >= 1 - alpha - margin


# -- bad input ---------------------------------------------------------------------------------------
def test_bad_input_is_named(tmp):
    cache, te, test_uri = _world("diabetes", tmp)
    with pytest.raises(InputError, match=r"unknown ids \(not in the data\): 99999"):
        many.loo(cache, [1, 99999])
    with pytest.raises(InputError, match=r"K must be an integer with 2 <= K <= 300"):
        many.conformal(cache, test_uri, 0.1, method="cv+", folds=1)
    with pytest.raises(InputError, match=r"K must be an integer with 2 <= K <= 300"):
        many.conformal(cache, test_uri, 0.1, method="cv+", folds=301)
    with pytest.raises(InputError, match=r"alpha must be in \(0, 1\), got 1.5"):
        many.conformal(cache, test_uri, 1.5)
    wide = sklearn_dataset("breast_cancer")
    write_dataset(wide, f"{tmp}/wide.parquet", overwrite=True)
    with pytest.raises(InputError, match="test set: rows have 30 features, expected 10"):
        many.conformal(cache, f"{tmp}/wide.parquet", 0.1)
