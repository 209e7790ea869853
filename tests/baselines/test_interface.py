"""Every method through the same interface: fit once, apply changes, compare with its exact reference."""

import pytest
import torch

from deltagrad_ray.baselines import (DeltaGrad, ExactRetrain, FineTune, NewtonStep, Outcome, QKMeans, Ridge,
                                     Sisa)
from deltagrad_ray.core import InputError

from .problems import LINEAR, LOGREG_SHORT, N, classification, random_ids, regression

METHODS = {
    "retrain": (ExactRetrain(LOGREG_SHORT), classification),
    "deltagrad": (DeltaGrad(LOGREG_SHORT), classification),
    "finetune": (FineTune(LOGREG_SHORT, k=3), classification),
    "newton": (NewtonStep(LOGREG_SHORT), classification),
    "sisa": (Sisa(LOGREG_SHORT, shards=3, slices=2), classification),
    "ridge": (Ridge(l2=LINEAR.l2), regression),
    "linear-deltagrad": (DeltaGrad(LINEAR), regression),
    "q-k-means": (QKMeans(3, iters=4, eps=0.5), classification),
}


@pytest.mark.parametrize("key", list(METHODS))
def test_fit_apply_exact_and_chain(key):
    method, problem = METHODS[key]
    data, extra = problem()
    st = method.fit(data)
    assert isinstance(method.name, str) and method.name
    first = method.apply(st, method.change(st, delete_ids=random_ids(N, 10, 1)))
    assert isinstance(first, Outcome) and isinstance(first.info, dict)
    # a second request (a deletion and an addition) against the state the first one returned
    ch = method.change(first.state, delete_ids=random_ids(N, 25, 1)[10:], add=extra)
    second, ref = method.apply(first.state, ch), method.exact(first.state, ch)
    assert second.params.shape == ref.params.shape == first.params.shape
    assert first.state.rows.n_active == N - 10 and second.state.rows.n_active == N - 25 + len(extra)
    assert torch.equal(second.state.rows.active().ids, ref.state.rows.active().ids)
    X_test, y_test = data.X[:200], data.y[:200]
    metrics = method.evaluate(second.state, X_test, y_test)
    assert set(metrics) & {"accuracy", "mse", "loss"}
    # the original state is untouched: requests are pure functions of their inputs
    again = method.apply(st, method.change(st, delete_ids=random_ids(N, 10, 1)))
    assert torch.equal(again.params, first.params)


@pytest.mark.parametrize("key", list(METHODS))
def test_bad_requests_are_clear_errors(key):
    method, problem = METHODS[key]
    data, _ = problem()
    st = method.fit(data)
    with pytest.raises(InputError, match=r"unknown ids to delete \(not in the data\): 123456789"):
        method.change(st, delete_ids=torch.tensor([1, 123456789]))
    with pytest.raises(InputError, match="duplicate ids to delete: 4"):
        method.change(st, delete_ids=torch.tensor([4, 4]))
    with pytest.raises(InputError, match=f"the request deletes every one of the {N} remaining rows"):
        method.change(st, delete_ids=data.ids)
    with pytest.raises(InputError, match="added rows reuse ids already in the data: 0, 1"):
        method.change(st, add=data.rows(torch.arange(2)))
