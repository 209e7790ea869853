"""A cache keeps working when its source table is rewritten without the rows it erased (the source
rows must go too): the rewritten table is checked row by row against the digests recorded at
training, and the erased rows come back as placeholders that never enter a gradient. Anything
else (a kept row edited, a row left out that the cache did not erase, rows reordered, a row added)
is refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from deltagrad_ray import api
from deltagrad_ray.core import InputError, synthetic_classification
from deltagrad_ray.core.data import Dataset
from deltagrad_ray.store import open_cache, write_dataset
from deltagrad_ray.store.cache import labels_only

N = 400
BOUND = {"gd": 0.05, "sgd": 0.12}  # of the distance the deletions move the model (see the first test)


def _without(data: Dataset, ids) -> Dataset:
    keep = ~torch.isin(data.ids, torch.as_tensor(list(ids)))
    return data.rows(torch.nonzero(keep).reshape(-1))


@pytest.fixture(scope="module", params=["gd", "sgd"])
def rewritten(request, tmp_path_factory):
    """fit → unlearn A into a derived cache → the table rewritten without A's rows."""
    d = tmp_path_factory.mktemp(f"rewrite-{request.param}")
    data = synthetic_classification(N, 8, 3, seed=3)
    src = d / "data.parquet"
    write_dataset(data, src)
    write_dataset(data, d / "original.parquet")  # a copy, to compare with
    kw = {"batch_size": 200, "steps": 80, "lr": 0.2} if request.param == "sgd" else {"steps": 60, "lr": 0.5}
    c0 = api.fit(str(src), str(d / "c0"), optimizer=request.param, l2=0.01, **kw)
    A, B = [3, 17, 40, 41, 200, 399], [5, 90, 100, 110, 120, 130, 250, 251, 300, 310, 320, 330]
    before = c0.data()
    exact_ab = api.retrain_exact(c0, delete=A + B)   # the ground truth, from the original table
    api.unlearn(c0, delete=A, out_cache=str(d / "c1"))
    write_dataset(_without(data, A), src, overwrite=True)
    return d, data, before, c0, open_cache(d / "c1"), A, B, exact_ab


def test_unlearning_goes_on_after_the_table_is_rewritten_without_the_erased_rows(rewritten):
    d, data, before, c0, c1, A, B, exact_ab = rewritten
    res = api.unlearn(c1, delete=B, out_cache=str(d / "c2"))
    # the same replay over the original table (the erased rows' real features in place of placeholders)
    same = api.unlearn(c1, delete=B, data=str(d / "original.parquet"))
    assert float((res.params - same.params).norm()) <= 1e-12 * float(same.params.norm())
    # DeltaGrad from the derived cache, over the rewritten table, against exact retraining on the original
    # table without A ∪ B, relative to the distance the deletions move the model; two replays chained (A,
    # then B), so the errors of both count: measured GD 0.004, SGD 0.07 (mini-batch curvature is noisier);
    # a no-op (θ of c1) is 0.67 off
    moved = float((exact_ab - c0.final).norm())
    assert moved > 0
    bound = BOUND[c0.manifest.training.optimizer]
    assert float((res.params - exact_ab).norm()) <= bound * moved
    assert float((c1.final - exact_ab).norm()) > 2 * bound * moved  # B's deletion moves the model: no no-op passes
    # exact retraining through the placeholders is the same computation as on the original table:
    # removed rows never enter a gradient, whatever their features
    again = api.retrain_exact(c1, delete=B)
    assert float((again - exact_ab).norm()) <= 1e-10 * float(exact_ab.norm())
    # the cache derived from the derived one reads the rewritten table too (it carries the digests)
    c2 = open_cache(d / "c2")
    assert "rows.parquet" in c2.manifest.files
    assert c2.manifest.files["rows.parquet"] == c0.manifest.files["rows.parquet"]
    ids, removed = c2.row_ids()
    assert np.array_equal(ids, data.ids.numpy()) and set(ids[removed].tolist()) == set(A + B)
    # the original cache erased nothing: the rewritten table is not its data
    with pytest.raises(InputError, match=r"id 3 is missing \(6 id\(s\) in all\) but was not erased by the cache"):
        api.unlearn(c0, delete=B)


def test_every_read_path_puts_the_erased_rows_back_as_placeholders(rewritten):
    d, data, before, c0, c1, A, B, _ = rewritten
    got = c1.data()
    gone = torch.isin(got.ids, torch.tensor(A))
    assert torch.equal(got.ids, before.ids) and len(got) == c1.n_rows == N
    assert torch.equal(got.X[~gone], before.X[~gone]) and torch.equal(got.y[~gone], before.y[~gone])
    assert not bool(got.X[gone].any()) and not bool(got.y[gone].any())   # placeholders: zeros
    assert torch.equal(gone, c1.removed_mask())
    # a data shard's rows: another slice of the rewritten table, the same rows as data()
    for a, b in [(0, 50), (30, 260), (390, 400)]:
        part = c1.data_rows(a, b)
        assert torch.equal(part.X, got.X[a:b]) and torch.equal(part.ids, got.ids[a:b])
    lab = labels_only(c1)
    assert torch.equal(lab.ids, got.ids) and torch.equal(lab.y, got.y)
    ids, removed = c1.row_ids()
    assert np.array_equal(ids, before.ids.numpy()) and np.array_equal(removed, gone.numpy())
    # the training curve: over the rows the path was trained on (placeholders, like the erased rows, left out)
    kept = before.rows(torch.nonzero(~gone).reshape(-1))
    th = c1.final
    want = float(c1.model.loss_sum(th, kept.X, kept.y) / len(kept) + c1.l2 / 2 * (th @ th))
    assert abs(api.training_curve(c1)[1][-1] - want) <= 1e-12 * abs(want)
    # the mapped feature copy (an optional local file, not in the manifest): the kept rows from the copy
    copy = d / "c1copy"
    shutil.copytree(d / "c1", copy)
    np.save(copy / "features.npy", before.X.numpy())
    mapped = open_cache(copy).data()
    assert torch.equal(mapped.X, got.X) and torch.equal(mapped.ids, got.ids)


def _hostile(d, c1, data, A, edit):
    """c1 over a copy of its data rewritten without A and then ``edit``-ed: every read refused."""
    rows = _without(data, A)
    X, y, ids = rows.X.clone(), rows.y.clone(), rows.ids.clone()
    X, y, ids = edit(X, y, ids)
    src = d / "hostile.parquet"
    write_dataset(Dataset(X, y, ids), src, overwrite=True)
    return str(src)


def _edit_features(X, y, i):
    X[7, 2] += 0.5
    return X, y, i


def _edit_label(X, y, i):
    y[9] = (y[9] + 1) % 3
    return X, y, i


def _leave_out_22(X, y, i):
    keep = i != 22
    return X[keep], y[keep], i[keep]


def _swap_first_two(X, y, i):
    order = torch.tensor([1, 0, *range(2, len(X))])
    return X[order], y[order], i[order]


def _add_a_row(X, y, i):
    return torch.cat([X, X[:1]]), torch.cat([y, y[:1]]), torch.cat([i, torch.tensor([10**6])])


def _put_back_3_edited(X, y, i):
    return torch.cat([X[:3], X[:1] + 1, X[3:]]), torch.cat([y[:3], y[:1], y[3:]]), torch.cat([i[:3], torch.tensor([3]),
                                                                                             i[3:]])


EDITS = {  # what → (edit of the table without A, the message)
    "a kept row's features edited": (_edit_features, r"row 7 \(id 8\) differs from the row the cache was trained on"),
    "a kept row's label edited": (_edit_label, r"row 9 \(id 10\) differs from the row the cache"),
    "a row left out the cache did not erase": (_leave_out_22, r"id 22 is missing \(1 id\(s\) in all\) but was not "
                                                              r"erased by the cache"),
    "rows reordered": (_swap_first_two, r"row 1 \(id 0\) is out of the original order \(the cache was trained "
                                        r"on it as row 0\)"),
    "a row added": (_add_a_row, r"row 394 \(id 1000000\) is not a row the cache was trained on \(an added row\)"),
    "an erased row put back edited": (_put_back_3_edited, r"row 3 \(id 3\) differs from the row the cache"),
}


@pytest.mark.parametrize("what", list(EDITS))
def test_a_table_that_is_not_the_original_without_erased_rows_is_refused(rewritten, what):
    d, data, before, c0, c1, A, B, _ = rewritten
    edit, message = EDITS[what]
    src = _hostile(d, c1, data, A, edit)
    with pytest.raises(InputError, match=message) as e:
        api.unlearn(c1, delete=B, data=src)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{src} is not the data set the cache {c1.uri} was trained on, nor that set without "
                                   "rows the cache erased: ")
    with pytest.raises(InputError, match=message):
        c1.data_rows(0, 100, src)
    if "differs" not in message:  # ids alone show it
        with pytest.raises(InputError, match=message):
            c1.row_ids(src)
        with pytest.raises(InputError, match=message):
            labels_only(c1, src)


def test_a_cache_without_row_digests_keeps_the_fingerprint_check(rewritten, tmp_path):
    d, data, before, c0, c1, A, B, _ = rewritten
    old = tmp_path / "old"
    shutil.copytree(d / "c1", old)
    m = json.loads((old / "manifest.json").read_text())
    del m["files"]["rows.parquet"]   # as written before this release
    (old / "manifest.json").write_text(json.dumps(m))
    (old / "rows.parquet").unlink()
    with pytest.raises(InputError, match=r"is not the data set the cache .* was trained on \(fingerprint .*\); give "
                                         r"the data set it was trained on, or train the cache again with this release"):
        api.unlearn(str(old), delete=B)
