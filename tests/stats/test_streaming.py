"""Streamed statistics (chunks of models and of test points) against the dense reference functions."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch.func import vmap

from deltagrad_ray import api, many
from deltagrad_ray.core import InputError, ModelSpec
from deltagrad_ray.core.data import rows_of_ids
from deltagrad_ray.datasets import sklearn_dataset, train_test_split
from deltagrad_ray.store.parts import ResultSink, SinkTable
from deltagrad_ray.stats import (Calibration, Chunks, TensorTable, jackknife, jackknife_plus_intervals,
                                 jackknife_plus_sets, plan_chunks, predict, streamed_intervals, streamed_jackknife,
                                 streamed_sets, streamed_test_loss)
from deltagrad_ray.stats.streaming import own_rows
from deltagrad_ray.store import write_dataset

from ..processes import assert_same_across_processes

# odd sizes that divide neither the models (41, or 5 folds) nor the test points (23), one of each
# size 1, and sizes larger than the counts
CHUNKS = [Chunks(7, 13), Chunks(1, 1), Chunks(4, 23), Chunks(50, 5), Chunks(100, 100)]
N, M, D = 41, 23, 6


def _problem(kind: str, seed: int = 0):
    """A model, n perturbed parameter vectors around a 'full' one, calibration rows and test points."""
    g = torch.Generator().manual_seed(seed)
    spec = {"linear": ModelSpec("linear", D), "logreg": ModelSpec("logreg", D, 4),
            "mlp": ModelSpec("mlp", D, 3, hidden=(5,))}[kind]
    model = spec.build()
    full = torch.randn(model.p, generator=g, dtype=torch.float64)
    thetas = full + 0.3 * torch.randn(N, model.p, generator=g, dtype=torch.float64)
    X_tr = torch.randn(60, D, generator=g, dtype=torch.float64)
    y_tr = (torch.randn(60, generator=g, dtype=torch.float64) if kind == "linear"
            else torch.randint(0, spec.n_classes, (60,), generator=g))
    X = torch.randn(M, D, generator=g, dtype=torch.float64)
    y = (torch.randn(M, generator=g, dtype=torch.float64) if kind == "linear"
         else torch.randint(0, spec.n_classes, (M,), generator=g))
    return model, full, thetas, X_tr, y_tr, X, y


def _calibration(method: str, X_tr, y_tr, seed: int = 0) -> tuple[Calibration, int]:
    """jackknife+: N calibration rows (a shuffled subset), model i without row i; CV+: 5 folds of 57 rows."""
    g = torch.Generator().manual_seed(seed)
    if method == "jackknife+":
        rows = torch.randperm(len(X_tr), generator=g)[:N]
        return Calibration(X_tr, y_tr, rows, torch.arange(N)), N
    rows = torch.randperm(len(X_tr), generator=g)[:57]
    return Calibration(X_tr, y_tr, rows, torch.randint(0, 5, (57,), generator=g)), 5


def _dense_loss(model, thetas, X, y):
    out = vmap(model.forward, in_dims=(0, None))(thetas, X)
    return vmap(lambda o: model.loss(o, y).mean())(out)


# -- jackknife and test losses --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "logreg", "mlp"])
@pytest.mark.parametrize("chunks", CHUNKS + [None], ids=str)
def test_streamed_jackknife_equals_the_dense_one(kind, chunks):
    model, full, thetas, _, _, X, y = _problem(kind)
    pred, loss = streamed_jackknife(model, full, TensorTable(thetas), X, y, chunks=chunks)
    ref_pred = jackknife(predict(model, full[None], X)[0], predict(model, thetas, X))
    ref_loss = jackknife(_dense_loss(model, full[None], X, y)[0], _dense_loss(model, thetas, X, y))
    for a, b in zip(pred + loss, ref_pred + ref_loss):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert float(pred.se.min()) > 0 and float(loss.se) > 0       # the models do differ


def test_the_streaming_mean_and_variance_stay_accurate_far_from_zero():
    # predictions ≈ 1e8 + O(1): a one-pass Σx² − n·x̄² would lose every digit of the spread
    model = ModelSpec("linear", 1).build()
    g = torch.Generator().manual_seed(1)
    thetas = torch.stack([torch.zeros(500, dtype=torch.float64),
                          1e8 + torch.randn(500, generator=g, dtype=torch.float64)], dim=1)
    X, y = torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    pred, _ = streamed_jackknife(model, thetas[0], thetas, X, y, chunks=Chunks(7, 2))
    ref = jackknife(predict(model, thetas[:1], X)[0], predict(model, thetas, X))
    torch.testing.assert_close(pred.se, ref.se, rtol=1e-9, atol=0)


@pytest.mark.parametrize("chunks", [Chunks(3, 5), Chunks(1, 100)], ids=str)
def test_streamed_test_loss_equals_the_dense_one(chunks):
    model, full, thetas, _, _, X, y = _problem("logreg")
    torch.testing.assert_close(streamed_test_loss(model, thetas, X, y, chunks=chunks),
                               _dense_loss(model, thetas, X, y), rtol=1e-13, atol=0)


# -- jackknife+ and CV+ ---------------------------------------------------------------------------
def _dense_conformal(model, thetas, cal, X, alpha):
    """The dense computation the API did before streaming: every model on every test point."""
    own = own_rows(model, thetas[cal.model_of], cal.X[cal.rows])
    test_out = predict(model, thetas, X)[cal.model_of]
    if model.task == "regression":
        return jackknife_plus_intervals(own, cal.y[cal.rows], test_out, alpha)
    return jackknife_plus_sets(own, cal.y[cal.rows], test_out, alpha)


@pytest.mark.parametrize("method", ["jackknife+", "cv+"])
@pytest.mark.parametrize("chunks", CHUNKS + [None], ids=str)
@pytest.mark.parametrize("alpha", [0.1, 0.33, 0.01])
def test_streamed_intervals_equal_the_dense_ones(method, chunks, alpha):
    model, _, thetas, X_tr, y_tr, X, _ = _problem("linear")
    cal, k = _calibration(method, X_tr, y_tr)
    lo, hi = streamed_intervals(model, thetas[:k], cal, X, alpha, chunks=chunks)
    ref_lo, ref_hi = _dense_conformal(model, thetas[:k], cal, X, alpha)
    torch.testing.assert_close(lo, ref_lo, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(hi, ref_hi, rtol=1e-13, atol=1e-14)
    if alpha == 0.01:                        # ⌈0.99 · (n + 1)⌉ > n: infinite, as Barber et al. define
        assert torch.isinf(hi).all() and torch.isinf(lo).all()
    else:
        assert torch.isfinite(hi).all() and bool((hi > lo).all())


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
@pytest.mark.parametrize("method", ["jackknife+", "cv+"])
@pytest.mark.parametrize("chunks", CHUNKS + [None], ids=str)
def test_streamed_sets_equal_the_dense_ones(kind, method, chunks):
    model, _, thetas, X_tr, y_tr, X, _ = _problem(kind)
    cal, k = _calibration(method, X_tr, y_tr)
    for alpha in (0.1, 0.3, 0.6):
        sets = streamed_sets(model, thetas[:k], cal, X, alpha, chunks=chunks)
        assert torch.equal(sets, _dense_conformal(model, thetas[:k], cal, X, alpha))
    # a statistic that says nothing would pass the equality: these sets are neither full nor empty
    assert 0 < float(sets.double().mean()) < 1


def test_a_small_budget_gives_small_chunks_and_the_same_result():
    model, _, thetas, X_tr, y_tr, X, _ = _problem("linear")
    cal, k = _calibration("jackknife+", X_tr, y_tr)
    tiny = plan_chunks(model, N, M, memory_mb=0.005, quantile_rows=N)
    assert tiny.tests < M and tiny.models < N
    a = streamed_intervals(model, thetas, cal, X, 0.1, memory_mb=0.005)
    b = streamed_intervals(model, thetas, cal, X, 0.1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_the_planned_buffers_fit_the_budget_whatever_the_number_of_test_points():
    model = ModelSpec("linear", 50).build()
    plans = {m: plan_chunks(model, 20_000, m, memory_mb=256, quantile_rows=20_000) for m in (10_000, 10 ** 6)}
    for ch in plans.values():
        # half the budget: the order-statistic buffers (values, ±R copy, kthvalue's copy and its indices)
        assert 20_000 * ch.tests * (3 * 8 + 8) <= 128 * 2 ** 20
        # the other half: a chunk of models (and its cast copy) and its outputs on the test chunk
        assert ch.models * 51 * 16 + ch.models * ch.tests * 8 * (4 * 1 + 2) <= 128 * 2 ** 20
    assert plans[10_000] == plans[10 ** 6]                    # flat in the number of test points


# -- models read back from the result parts ------------------------------------------------------
def _write_parts(root, thetas: torch.Tensor, sizes, seed=0, errors=None) -> None:
    """Parts as a fan-out leaves them: batches of consecutive requests, finished in any order."""
    sink = ResultSink(root, {"test": seed})
    bounds = np.cumsum([0, *sizes])
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(seed)).tolist()
    for k in order:
        req = list(range(int(bounds[k]), int(bounds[k + 1])))
        counters = {c: torch.zeros(len(req), dtype=torch.int64) for c in ("explicit_steps", "approx_steps",
                                                                            "fallbacks", "skipped_pairs")}
        sink.write(req, thetas[req], counters, {r: e for r, e in (errors or {}).items() if r in req})


def test_sink_table_reads_the_models_back_in_request_order(tmp_path):
    thetas = torch.randn(N, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _write_parts(tmp_path / "parts", thetas, [8, 8, 3, 8, 8, 6])
    table = SinkTable(tmp_path / "parts")
    assert len(table) == N and table.p == 9 and table.errors == {}
    for size in (1, 5, 8, 13, 100):
        got = list(table.chunks(size))
        assert [s for s, _ in got] == list(range(0, N, size))
        assert torch.equal(torch.cat([c for _, c in got]), thetas)
    idx = torch.tensor([40, 0, 17, 17, 3])
    assert torch.equal(table.rows(idx), thetas[idx])


def test_sink_table_reads_parts_on_s3(moto_s3, s3_env):
    s3_env(moto_s3)
    bucket = moto_s3.make_bucket("dg-streaming")
    thetas = torch.randn(N, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _write_parts(f"s3://{bucket}/run/models.parts", thetas, [16, 16, 9])
    table = SinkTable(f"s3://{bucket}/run/models.parts", n=N)
    assert torch.equal(torch.cat([c for _, c in table.chunks(6)]), thetas)
    assert torch.equal(table.rows(torch.tensor([33, 2])), thetas[[33, 2]])


def test_sink_table_with_interleaved_parts(tmp_path):
    # a resumed run: batches of the requests still pending, which skip those already done
    thetas = torch.randn(20, 4, dtype=torch.float64)
    sink = ResultSink(tmp_path / "p", {"x": 1})
    counters = lambda n: {c: torch.zeros(n, dtype=torch.int64) for c in ("explicit_steps", "approx_steps",
                                                                          "fallbacks", "skipped_pairs")}
    for req in ([0, 5, 10, 15], [1, 2, 3, 4], list(range(16, 20)), [6, 7, 8, 9, 11, 12, 13, 14]):
        sink.write(req, thetas[req], counters(len(req)), {})
    for size in (3, 7):
        assert torch.equal(torch.cat([c for _, c in SinkTable(tmp_path / "p").chunks(size)]), thetas)


@pytest.mark.parametrize("method", ["jackknife+", "cv+"])
def test_statistics_from_the_result_parts_equal_those_from_memory(tmp_path, method):
    model, full, thetas, X_tr, y_tr, X, y = _problem("linear")
    cal, k = _calibration(method, X_tr, y_tr)
    _write_parts(tmp_path / "parts", thetas[:k], [3] * (k // 3) + ([k % 3] if k % 3 else []))
    table = SinkTable(tmp_path / "parts", n=k)
    # a budget too small for the table to be read once: it is read again for every test chunk
    for chunks, memory in ((Chunks(4, 6), 256), (None, 0.004)):
        a = streamed_intervals(model, table, cal, X, 0.2, chunks=chunks, memory_mb=memory)
        b = streamed_intervals(model, thetas[:k], cal, X, 0.2, chunks=chunks, memory_mb=memory)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    if method == "jackknife+":
        a = streamed_jackknife(model, full, table, X, y, chunks=Chunks(6, 5))
        b = streamed_jackknife(model, full, thetas, X, y, chunks=Chunks(6, 5))
        assert all(torch.equal(u, v) for u, v in zip(a[0] + a[1], b[0] + b[1]))


def test_sink_table_refuses_incomplete_or_repeated_results(tmp_path):
    thetas = torch.randn(10, 3, dtype=torch.float64)
    _write_parts(tmp_path / "a", thetas, [4, 4, 2])
    with pytest.raises(InputError, match=r"results for requests 0..11 expected exactly once each; 2 missing "
                                         r"\(e.g. \[10, 11\]\)"):
        SinkTable(tmp_path / "a", n=12)
    with pytest.raises(InputError, match=r"rows must be in \[0, 10\), got values in \[3, 10\]"):
        SinkTable(tmp_path / "a").rows([3, 10])
    sink = ResultSink(tmp_path / "a", {"test": 0})
    sink.write([2], thetas[[2]], {"explicit_steps": torch.zeros(1, dtype=torch.int64)}, {})
    with pytest.raises(InputError, match=r"1 repeated \(e.g. \[2\]\)"):
        SinkTable(tmp_path / "a")
    with pytest.raises(InputError, match="no result parts"):
        SinkTable(tmp_path / "empty")


def test_sink_table_reports_failed_requests(tmp_path):
    thetas = torch.randn(6, 3, dtype=torch.float64)
    thetas[4] = float("nan")
    _write_parts(tmp_path / "p", thetas, [3, 3], errors={4: "the replay produced NaN or inf parameters"})
    assert SinkTable(tmp_path / "p").errors == {4: "the replay produced NaN or inf parameters"}


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input_is_named():
    model, full, thetas, X_tr, y_tr, X, y = _problem("linear")
    cal, _ = _calibration("jackknife+", X_tr, y_tr)
    with pytest.raises(InputError, match=r"memory_mb must be a number > 0, got 0"):
        streamed_intervals(model, thetas, cal, X, 0.1, memory_mb=0)
    with pytest.raises(InputError, match=r"memory_mb must be a number > 0, got nan"):
        streamed_jackknife(model, full, thetas, X, y, memory_mb=math.nan)
    with pytest.raises(InputError, match=r"chunks.tests must be an integer >= 1, got 0"):
        streamed_test_loss(model, thetas, X, y, chunks=Chunks(3, 0))
    with pytest.raises(InputError, match=r"chunk size must be an integer >= 1, got 0"):
        next(TensorTable(thetas).chunks(0))
    with pytest.raises(InputError, match=r"models have 5 parameters, the model 7"):
        streamed_test_loss(model, thetas[:, :5], X, y)
    with pytest.raises(InputError, match=r"model_of must index the 41 models, got values in \[1, 41\]"):
        streamed_intervals(model, thetas, cal._replace(model_of=cal.model_of + 1), X, 0.1)
    with pytest.raises(InputError, match=r"model_of must hold one model per calibration point \(41\)"):
        streamed_intervals(model, thetas, cal._replace(model_of=cal.model_of[:3]), X, 0.1)
    with pytest.raises(InputError, match="the jackknife needs at least 2 leave-one-out values, got 1"):
        streamed_jackknife(model, full, thetas[:1], X, y)
    with pytest.raises(InputError, match=r"alpha must be in \(0, 1\), got 1.5"):
        streamed_intervals(model, thetas, cal, X, 1.5)
    with pytest.raises(InputError, match="prediction intervals need a regression model"):
        streamed_intervals(ModelSpec("logreg", D, 2).build(), thetas[:, :14], cal, X, 0.1)
    with pytest.raises(InputError, match="conformal sets need a classification model"):
        streamed_sets(model, thetas, cal, X, 0.1)
    with pytest.raises(InputError, match="models must be an \\(n, p\\) tensor or a ModelTable, got list"):
        streamed_test_loss(model, [1, 2], X, y)


# -- the API path -----------------------------------------------------------------------------------
@functools.cache
def _world(name: str, tmp: str):
    setups = {"diabetes": dict(model="linear", steps=60, lr=0.1, l2=0.001),
              "breast_cancer": dict(model="logreg", steps=60, lr=0.5, l2=0.001)}
    tr, te = train_test_split(sklearn_dataset(name), 120, seed=0)
    write_dataset(tr, f"{tmp}/{name}-train.parquet", overwrite=True)
    write_dataset(te, f"{tmp}/{name}-test.parquet", overwrite=True)
    cache = api.fit(f"{tmp}/{name}-train.parquet", f"{tmp}/{name}-cache", **setups[name])
    return cache, te, f"{tmp}/{name}-test.parquet"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("streaming"))


def _dense_api(cache, te, method, fanout, ids=None):
    """What ``many.conformal`` computed before streaming, from the same replayed models."""
    ds = cache.data()
    ids = ds.ids if ids is None else ids
    if method == "jackknife+":
        res = many.loo(cache, ids, fanout=fanout, strict=True)
        params, rows, model_of = res.params, rows_of_ids(ds.ids, ids), torch.arange(len(ids))
    else:
        from deltagrad_ray.core.requests import fold_assignment, k_fold
        changes = k_fold(ds, 10, ids=ids, seed=0)
        params = fanout.run(cache, ds, changes).params.to(cache.dtype)
        rows = torch.cat([c.delete for c in changes])
        model_of = fold_assignment(ds, changes)[rows]
    return _dense_conformal(cache.model, params, Calibration(ds.X, ds.y, rows, model_of), te.X.to(cache.dtype), 0.1)


@pytest.mark.parametrize("name,method", [("diabetes", "jackknife+"), ("diabetes", "cv+"),
                                         ("breast_cancer", "jackknife+"), ("breast_cancer", "cv+")])
def test_many_conformal_streams_and_equals_the_dense_computation(tmp, name, method):
    cache, te, test_uri = _world(name, tmp)
    fan = many.Fanout(batch_size=16)
    # 0.01 MB: chunks of a few models and test points
    out = many.conformal(cache, test_uri, 0.1, method=method, fanout=fan, memory_mb=0.01)
    ref = _dense_api(cache, te, method, fan)
    if name == "diabetes":
        torch.testing.assert_close((out["lower"], out["upper"]), ref, rtol=1e-13, atol=1e-12)
        # DeltaGrad's own accuracy is checked against exact refits in test_stats.py; here the replay must
        # have moved the models, or every interval would have width 2·R-quantile around one prediction
        assert float((out["upper"] - out["lower"]).std()) > 0
    else:
        assert torch.equal(out["sets"], ref)


def test_many_jackknife_and_influence_stream_and_equal_the_dense_computation(tmp):
    cache, te, test_uri = _world("breast_cancer", tmp)
    ids = cache.data().ids[:30]
    res = many.loo(cache, ids, strict=True)
    jk = many.jackknife(cache, test_uri, loo_result=res, memory_mb=0.01)
    X = te.X.to(cache.dtype)
    full = cache.final[None]
    ref = jackknife(predict(cache.model, full, X)[0], predict(cache.model, res.params, X))
    for a, b in zip(jk["predictions"], ref):       # probabilities: round-off ≈ n · 1e-16
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    loss = _dense_loss(cache.model, res.params, X, te.y)
    full_loss = _dense_loss(cache.model, full, X, te.y)[0]
    torch.testing.assert_close(jk["test_loss"].se, jackknife(full_loss, loss).se, rtol=1e-12, atol=0)
    inf = many.influence(cache, test_uri, loo_result=res, memory_mb=0.01)
    torch.testing.assert_close(inf["influence"], loss - full_loss, rtol=1e-9, atol=1e-15)
    assert float(inf["influence"].abs().max()) > 0


@pytest.mark.slow
def test_the_ray_path_streams_the_same_statistics(ray_cluster, tmp):
    from deltagrad_ray.distributed.backends import RayBackend
    cache, te, test_uri = _world("diabetes", tmp)
    ray_fan = many.Fanout(backend=RayBackend(workers=2, resources={"accel": 1}), batch_size=16)
    on_ray = many.conformal(cache, test_uri, 0.1, fanout=ray_fan, memory_mb=0.01)
    serial = many.conformal(cache, test_uri, 0.1, fanout=many.Fanout(batch_size=16), memory_mb=0.01)
    assert on_ray["replay"].stats["backend"] == "ray"
    # the models come from other processes: end points equal to round-off (tests/processes.py)
    assert_same_across_processes(on_ray["lower"], serial["lower"], "lower")
    assert_same_across_processes(on_ray["upper"], serial["upper"], "upper")


def test_the_cli_takes_a_memory_budget(tmp_path):
    from deltagrad_ray.results import read_table
    from tests.cli.test_cli import ok, run
    tr, te = train_test_split(sklearn_dataset("diabetes"), 80, n_test=30)
    write_dataset(tr, tmp_path / "train.parquet")
    write_dataset(te, tmp_path / "test.parquet")
    ok("train", "--data", "train.parquet", "--model", "linear", "--steps", "40", "--lr", "0.1", "--cache", "c",
       cwd=tmp_path)
    common = ("conformal", "--cache", "c", "--test", "test.parquet")
    ok(*common, "--out", "a.parquet", cwd=tmp_path)
    ok(*common, "--memory-mb", "0.01", "--out", "b.parquet", cwd=tmp_path)
    a, b = read_table(tmp_path / "a.parquet")[0], read_table(tmp_path / "b.parquet")[0]
    assert a.equals(b) and a.num_rows == 30
    p = run(*common, "--memory-mb", "-1", "--out", "bad.parquet", cwd=tmp_path)
    assert p.returncode == 2 and "argument --memory-mb: must be a finite number > 0, got '-1'" in p.stderr
    assert not (tmp_path / "bad.parquet").exists()
