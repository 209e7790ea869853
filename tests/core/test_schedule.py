"""Batch order, learning rates and explicit-step schedules."""

import numpy as np
import pytest
import torch

from deltagrad_ray.core.schedule import FeistelPermutation
from deltagrad_ray.core import (BatchPlan, DeltaGradConfig, InputError, geometric_explicit_steps,
                                learning_rates, speedup_bound, uniform_explicit_steps)


def test_permutation_is_seeded_and_pinned():
    plan = BatchPlan(10, 3, seed=0)
    p0 = plan.permutation(0)
    assert sorted(p0.tolist()) == list(range(10))
    assert torch.equal(p0, BatchPlan(10, 3, seed=0).permutation(0))
    assert not torch.equal(p0, plan.permutation(1))
    assert not torch.equal(p0, BatchPlan(10, 3, seed=1).permutation(0))
    # pinned: a cache written today must replay tomorrow (no library RNG in the batch order)
    assert p0.tolist() == [6, 5, 7, 3, 1, 8, 2, 9, 0, 4]


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4096, 4097])
def test_feistel_permutation_is_a_bijection_with_inverse(n):
    perm = FeistelPermutation(n, np.uint64(99))
    rows = perm.rows_at(np.arange(n, dtype=np.uint64))
    assert sorted(rows.tolist()) == list(range(n))
    assert (perm.position(rows.astype(np.uint64)) == np.arange(n)).all()


def test_permutation_positions_are_close_to_uniform():
    # where row 0 lands over 4,000 epochs of 20 rows: a chi-square test at the 0.1% level
    plan = BatchPlan(20, 5, seed=3)
    pos = [int(plan.batch_of_base_rows(torch.tensor([0]), e)) for e in range(4000)]
    counts = np.bincount(pos, minlength=4)
    chi2 = float(((counts - 1000) ** 2 / 1000).sum())
    assert chi2 < 16.27  # chi-square(3 dof) 0.999 quantile


def test_batch_rows_are_the_slices_of_the_permutation():
    plan = BatchPlan(103, 10, seed=5)
    perm = plan.permutation(2)
    for k in (0, 5, 10):
        assert torch.equal(plan.batch_rows(2, k), perm[slice(*plan.batch_bounds(k))])


def test_batches_partition_each_epoch():
    plan = BatchPlan(103, 10, seed=5)
    assert plan.batches_per_epoch == 11
    for epoch in (0, 3):
        perm = plan.permutation(epoch)
        seen = torch.cat([perm[slice(*plan.batch_bounds(k))] for k in range(plan.batches_per_epoch)])
        assert sorted(seen.tolist()) == list(range(103))
        k = plan.batch_of_base_rows(torch.arange(103), epoch)
        for row in (0, 50, 102):
            lo, hi = plan.batch_bounds(int(k[row]))
            assert row in perm[lo:hi].tolist()


def test_added_rows_are_placed_by_their_own_id_only():
    plan = BatchPlan(1000, 100, seed=2)
    ids = torch.tensor([5000, 5001, 5002, 777777])
    alone = plan.batch_of_added_ids(ids[:1], 4)
    together = plan.batch_of_added_ids(ids, 4)
    assert together[0] == alone[0]
    assert together[[0, 3]].tolist() == [4, 2]  # pinned, like the permutation
    assert ((together >= 0) & (together < 10)).all()
    spread = plan.batch_of_added_ids(torch.arange(10_000, 20_000), 0)
    assert torch.bincount(spread, minlength=10).min() > 850  # roughly uniform


def test_full_batch_plan():
    plan = BatchPlan(50, None)
    assert plan.full_batch and plan.batches_per_epoch == 1
    assert BatchPlan(50, 50).full_batch  # one batch per epoch is GD


def test_learning_rate_milestones():
    lrs = learning_rates(10, 1.0, milestones=(3, 6), gamma=0.5)
    assert lrs.tolist() == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]
    with pytest.raises(InputError, match="milestones must be increasing"):
        learning_rates(10, 1.0, milestones=(6, 3))
    with pytest.raises(InputError, match="learning rate must be"):
        learning_rates(10, -1.0)


def test_uniform_schedule_and_bound():
    mask = uniform_explicit_steps(120, period=5, burn_in=10)
    assert mask[:10].all() and mask[10] and not mask[11] and mask[15]
    assert speedup_bound(mask) == pytest.approx(120 / (10 + 110 / 5), rel=0.02)
    assert DeltaGradConfig(period=5, burn_in=10).explicit_steps(120).equal(mask)


def test_geometric_schedule_spacing_grows_to_its_cap():
    mask = geometric_explicit_steps(400, burn_in=5, first_gap=2, growth=1.4, max_gap=40)
    where = torch.nonzero(mask).reshape(-1)
    gaps = (where[1:] - where[:-1])[5:]
    assert mask[:5].all()
    assert (gaps[1:] >= gaps[:-1]).all() and int(gaps.max()) == 40


@pytest.mark.parametrize("n, batch", [(1000, 64), (60_000, 16_384), (37, 5)])
def test_many_epochs_at_once_are_each_epochs_batches(n, batch):
    """A replay asks for its changed rows' batches of a run of epochs in one vectorised pass: the
    same batches, row by row, as asking one epoch at a time (the cycle walking included)."""
    plan = BatchPlan(n, batch, seed=7)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: min(n, 300)]
    many = plan.batches_of_base_rows(rows, range(3, 20))
    assert many.shape == (17, len(rows))
    for i, epoch in enumerate(range(3, 20)):
        assert torch.equal(many[i], plan.batch_of_base_rows(rows, epoch))
        k = many[i]
        for j in torch.unique(k).tolist():  # and each row really sits in the batch it is given
            assert set(rows[k == j].tolist()) <= set(plan.batch_rows(epoch, j).tolist())
    assert plan.batches_of_base_rows(rows, range(0)).shape == (0, len(rows))
    gd = BatchPlan(n, None).batches_of_base_rows(rows, range(2))
    assert torch.equal(gd, torch.zeros(2, len(rows), dtype=torch.int64))
