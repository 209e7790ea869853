"""SISA against its own exact reference: the ensemble trained from scratch with the same seeds."""

import pytest
import torch

from deltagrad_ray.baselines import ExactRetrain, Sisa, TrainConfig
from deltagrad_ray.core import InputError, ModelSpec

from .problems import LINEAR, LOGREG_SHORT, N, classification, random_ids, regression

SGD = TrainConfig(LOGREG_SHORT.spec, steps=60, lr=0.2, l2=0.01, batch_size=100, seed=5)


def _slice_rows(st, s: int, j: int) -> torch.Tensor:
    """Ids of rows in shard s, slice j."""
    return st.rows.data.ids[(st.shard == s) & (st.slice == j)]


@pytest.mark.parametrize("cfg", [LOGREG_SHORT, SGD, LINEAR], ids=["gd", "sgd", "linear"])
@pytest.mark.parametrize("case", ["delete-1", "delete-1%", "add", "delete+add"])
def test_apply_equals_sisa_from_scratch_bit_for_bit(cfg, case):
    data, extra = regression() if cfg is LINEAR else classification()
    sisa = Sisa(cfg, shards=4, slices=3)
    st = sisa.fit(data)
    delete = None if case == "add" else random_ids(N, 1 if case == "delete-1" else N // 100, 11)
    ch = sisa.change(st, delete_ids=delete, add=extra.rows(torch.arange(5)) if "add" in case else None)
    got, ref = sisa.apply(st, ch), sisa.exact(st, ch)
    assert float((ref.params - st.params).norm()) > 1e-6, "the change must move the ensemble"
    assert torch.equal(got.params, ref.params)


def test_only_changed_shards_retrain_from_the_last_clean_checkpoint():
    data, _ = classification()
    sisa = Sisa(LOGREG_SHORT, shards=5, slices=4)
    st = sisa.fit(data)
    victim = _slice_rows(st, 2, 3)[:1]            # shard 2, last slice: one stage to redo
    out = sisa.apply(st, sisa.change(st, delete_ids=victim))
    assert out.info["retrained_shards"] == [2] and out.info["from_slice"] == {2: 3}
    assert out.info["steps"] == sisa.stage_steps()[3] == 25
    untouched = [s for s in range(5) if s != 2]
    assert torch.equal(out.state.checkpoints[untouched], st.checkpoints[untouched])
    assert torch.equal(out.state.checkpoints[2, :4], st.checkpoints[2, :4])   # stages 0..2 kept
    assert not torch.equal(out.state.checkpoints[2, 4], st.checkpoints[2, 4])
    first = _slice_rows(st, 0, 0)[:1]             # shard 0, first slice: the whole shard
    out = sisa.apply(st, sisa.change(st, delete_ids=first))
    assert out.info["from_slice"] == {0: 0} and out.info["steps"] == LOGREG_SHORT.steps


def test_sequential_deletions_equal_one_fit_on_the_rest():
    data, _ = classification()
    sisa = Sisa(LOGREG_SHORT, shards=3, slices=2)
    st = sisa.fit(data)
    for ids in random_ids(N, 30, 4).split(10):
        st = sisa.apply(st, sisa.change(st, delete_ids=ids)).state
    assert torch.equal(st.params, sisa.fit(st.rows.active()).params)


def test_one_shard_one_slice_is_the_single_model():
    data, _ = classification()
    single = ExactRetrain(LOGREG_SHORT).fit(data).params
    assert torch.equal(Sisa(LOGREG_SHORT, shards=1, slices=1).fit(data).params[0], single)


def test_aggregation_by_average_and_vote():
    data, _ = classification()
    test_X, test_y = data.X[:500], data.y[:500]
    avg, vote = Sisa(LOGREG_SHORT, shards=5), Sisa(LOGREG_SHORT, shards=5, aggregate="vote")
    st = avg.fit(data)
    acc_avg = avg.evaluate(st, test_X, test_y)["accuracy"]
    acc_vote = vote.evaluate(st, test_X, test_y)["accuracy"]
    single = ExactRetrain(LOGREG_SHORT)
    acc_single = single.evaluate(single.fit(data), test_X, test_y)["accuracy"]
    assert acc_avg > 0.8 and acc_vote > 0.8 and abs(acc_avg - acc_single) < 0.05
    # where a strict majority of the shard models agree, the vote is that label
    preds = torch.stack([st.model.predict(theta, test_X) for theta in st.params])    # (S, n)
    top, count = torch.mode(preds, dim=0).values, (preds == torch.mode(preds, dim=0).values).sum(0)
    majority = count > 5 / 2
    assert bool(majority.any()) and torch.equal(vote.predict(st, test_X)[majority], top[majority])
    # a linear model's averaged outputs are the outputs of the averaged parameters
    lin = Sisa(LINEAR, shards=4)
    ls = lin.fit(regression()[0])
    assert torch.allclose(lin.predict(ls, test_X), ls.model.predict(ls.params.mean(0), test_X), atol=1e-12)


def test_bad_input():
    with pytest.raises(InputError, match="SISA needs S >= 1 shards, got S=0"):
        Sisa(LOGREG_SHORT, shards=0)
    with pytest.raises(InputError, match="SISA needs R >= 1 slices per shard, got R=0"):
        Sisa(LOGREG_SHORT, slices=0)
    with pytest.raises(InputError, match="slices R=200 exceed the 100 training steps"):
        Sisa(LOGREG_SHORT, slices=200)
    with pytest.raises(InputError, match="aggregate must be one of average, vote, got 'median'"):
        Sisa(LOGREG_SHORT, aggregate="median")
    with pytest.raises(InputError, match="aggregate='vote' needs a classifier"):
        Sisa(LINEAR, aggregate="vote")
    data, _ = classification()
    with pytest.raises(InputError, match="at least one row per shard: 3 rows for S=5"):
        Sisa(LOGREG_SHORT, shards=5).fit(data.rows(torch.arange(3)))
    sisa = Sisa(LOGREG_SHORT, shards=2)
    st = sisa.fit(data)
    with pytest.raises(InputError, match=r"unknown ids to delete \(not in the data\): -4"):
        sisa.change(st, delete_ids=torch.tensor([-4]))
    with pytest.raises(InputError, match="rows have 8 features, expected 3"):
        Sisa(TrainConfig(ModelSpec("logreg", 3, 3), steps=5, lr=0.1)).fit(data)
