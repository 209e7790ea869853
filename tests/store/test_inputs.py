"""Data in every accepted form becomes the same Dataset; bad data is one line naming the row and column;
api.fit and many.* take it (api.fit stores in-memory data inside the cache, and replays verify it)."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deltagrad_ray import api, many
from deltagrad_ray.core import InputError
from deltagrad_ray.store.inputs import as_dataset, has_labels

RNG = np.random.RandomState(0)
X = RNG.normal(size=(40, 3))
Y = RNG.randint(0, 3, size=40)


def same(ds, X=X, y=Y, ids=None):
    assert torch.equal(ds.X, torch.from_numpy(X)) and torch.equal(ds.y, torch.from_numpy(y).to(ds.y.dtype))
    assert torch.equal(ds.ids, torch.arange(len(X)) if ids is None else torch.as_tensor(ids))


def test_every_form_gives_the_same_rows(tmp_path):
    df = pd.DataFrame(X, columns=["a", "b", "c"]).assign(label=Y)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), 3)
    table = pa.table({"id": np.arange(40), "label": Y, "features": vec})
    pq.write_table(table, tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "cols.parquet")
    for data in (df, pa.Table.from_pandas(df, preserve_index=False), table, str(tmp_path / "d.parquet"),
                 tmp_path / "cols.parquet", (X, Y), pd.DataFrame({"features": list(X), "label": Y})):
        same(as_dataset(data))
    same(as_dataset(X, Y))
    same(as_dataset(X, list(Y), ids=np.arange(100, 140)), ids=np.arange(100, 140))
    same(as_dataset((X, Y, np.arange(7, 47))), ids=np.arange(7, 47))
    reg = as_dataset(df.assign(label=X[:, 0]), task="regression")
    assert reg.y.dtype == torch.float64 and torch.equal(reg.y, torch.from_numpy(X[:, 0]))
    test = as_dataset(df.drop(columns="label"), labels=False)       # rows to predict: no labels needed
    assert torch.equal(test.y, torch.zeros(40, dtype=torch.int64))
    assert has_labels(df) and has_labels((X, Y)) and not has_labels(df.drop(columns="label"))
    X32 = X.astype(np.float32)
    assert as_dataset(X32, Y).X.dtype == torch.float32


def test_a_copy_not_a_view():
    Xc = X.copy()
    ds = as_dataset(Xc, Y)
    Xc[0, 0] = 99.0
    assert ds.X[0, 0] == X[0, 0]


# Ray 2.60's DataContext warns about its own defaults of deprecated settings (use_push_based_shuffle,
# use_polars) when it is first created: Ray's warnings about Ray's code, not about this project's
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
def test_ray_data(ray_cluster):
    import ray.data
    df = pd.DataFrame(X, columns=["a", "b", "c"]).assign(label=Y)
    same(as_dataset(ray.data.from_pandas(df)))
    items = ray.data.from_items([{"features": X[i], "label": int(Y[i])} for i in range(40)])
    same(as_dataset(items))
    same(as_dataset(ray.data.from_numpy(X), Y))


BAD = [
    (lambda: as_dataset(np.ones(3), [0, 1, 1]),
     r"data: features must be a 2-D array \(rows × columns\), got shape \(3,\)"),
    (lambda: as_dataset(X, Y[:39]), "data: 39 labels for 40 rows; expected one label per row"),
    (lambda: as_dataset(X, Y, ids=np.arange(39)), "data: 39 ids for 40 rows"),
    (lambda: as_dataset(np.where(np.arange(120).reshape(40, 3) == 61, np.nan, X), Y),
     r"data: NaN in row 20, column 1$"),
    (lambda: as_dataset(pd.DataFrame({"a": [1.0, 2.0], "bmi": [np.inf, 1.0], "label": [0, 1]})),
     r"data: inf in row 0, column 1 \('bmi'\)"),
    (lambda: as_dataset(np.where(np.arange(120).reshape(40, 3) % 7 == 0, np.inf, X), Y, ids=np.arange(40) + 5),
     r"data: inf in row 0 \(id 5\), column 0; 18 rows have NaN or inf"),
    (lambda: as_dataset(X, np.where(np.arange(40) == 9, 3, Y), n_classes=3),
     r"data: label 3 in row 9 is out of range \[0, 3\)"),
    (lambda: as_dataset(X, np.where(np.arange(40) == 4, -1, Y)), r"data: label -1 in row 4 is out of range 0 or more"),
    (lambda: as_dataset(X, Y + 0.5), r"data: label 0.5 in row \d+ is not a class index"),
    (lambda: as_dataset(X, np.where(np.arange(40) == 2, np.nan, 1.0), task="regression"),
     "data: label NaN in row 2; labels must be finite"),
    (lambda: as_dataset(pd.DataFrame({"a": [1.0, 2.0], "name": ["x", "y"], "label": [0, 1]})),
     r"data: column 1 \('name'\) must hold numbers"),
    (lambda: as_dataset(pd.DataFrame({"a": [1.0, 2.0]})), "data: no 'label' column"),
    (lambda: as_dataset(X, Y, ids=[1] * 40), "data: duplicate id 1 in rows 0 and 1; ids must be unique"),
    (lambda: as_dataset(pd.DataFrame({"features": [[1.0, 2.0], [3.0]], "label": [0, 1]})),
     r"data: column 'features' has 1 values in row 1, expected 2"),
    (lambda: as_dataset(pd.DataFrame({"a": [1.0], "label": [0]}), [1]), "labels given twice"),
    (lambda: as_dataset(X), "features given as an array need labels y"),
]


@pytest.mark.parametrize("make, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_data_is_one_line(make, message):
    with pytest.raises(InputError, match=message) as e:
        make()
    assert "\n" not in str(e.value)


def test_api_fit_stores_in_memory_data_and_replays_verify_it(tmp_path):
    from sklearn.datasets import load_diabetes
    Xd, yd = load_diabetes(return_X_y=True)
    Xd = (Xd - Xd.mean(0)) / Xd.std(0)
    df = pd.DataFrame(Xd[:300], columns=[f"x{j}" for j in range(10)]).assign(label=yd[:300])
    cache = api.fit(df, tmp_path / "c", model="linear", steps=60, lr=0.1)
    assert cache.manifest.data.uri == str(tmp_path / "c" / "data" / "part-0.parquet")
    assert torch.equal(cache.data().X, torch.from_numpy(Xd[:300]))
    res = api.unlearn(cache, delete=[3, 4, 5])
    exact = api.retrain_exact(cache, delete=[3, 4, 5])
    assert float((res.params - exact).norm()) < 0.05 * float((exact - cache.final).norm())
    same_fit = api.fit(Xd[:300], tmp_path / "c2", y=yd[:300], model="linear", steps=60, lr=0.1)
    assert torch.equal(same_fit.final, cache.final)
    # many.* take the test rows in any form, with or without labels
    by_arrays = many.conformal(cache, (Xd[300:], yd[300:]), alpha=0.1, folds=5, method="cv+")
    by_frame = many.conformal(cache, pd.DataFrame(Xd[300:]).assign(label=yd[300:]), alpha=0.1, folds=5,
                              method="cv+")
    unlabelled = many.conformal(cache, Xd[300:], alpha=0.1, folds=5, method="cv+")
    assert torch.equal(by_arrays["lower"], by_frame["lower"]) and torch.equal(by_arrays["upper"], unlabelled["upper"])
    assert 0.7 < by_arrays["coverage"] <= 1 and "coverage" not in unlabelled
    jk = many.jackknife(cache, (Xd[300:310], yd[300:310]), ids=[0, 1, 2])
    assert jk["n_loo"] == 3
    with pytest.raises(InputError, match=r"test set: NaN in row 1, column 2"):
        many.conformal(cache, np.where(np.arange(20).reshape(2, 10) == 12, np.nan, 0.0), alpha=0.1)


def test_api_fit_checks_in_memory_labels(tmp_path):
    with pytest.raises(InputError, match=r"data: label 4 in row 0 is out of range \[0, 3\)"):
        api.fit(X, tmp_path / "c", y=np.where(np.arange(40) == 0, 4, Y), n_classes=3, steps=5)
    assert not (tmp_path / "c").exists()
