"""Cache.data_rows (a data shard's rows, read a row group at a time) against Cache.data."""

from __future__ import annotations

import pytest
import torch

from deltagrad_ray import api
from deltagrad_ray.core import Dataset, InputError, synthetic_classification, synthetic_regression
from deltagrad_ray.store import open_cache, read_dataset, write_dataset
from deltagrad_ray.store.datasets import fingerprint, read_rows

ROW_BYTES = 6 * 8  # 6 float64 features: row groups of 7 rows below


def _same(a: Dataset, b: Dataset) -> None:
    assert a.X.dtype == b.X.dtype and a.y.dtype == b.y.dtype
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y) and torch.equal(a.ids, b.ids)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("rows")
    data = synthetic_classification(100, 6, 3, seed=0)
    write_dataset(data, d / "data.parquet", row_group_bytes=7 * ROW_BYTES)
    base = api.fit(str(d / "data.parquet"), str(d / "c0"), steps=20, lr=0.3, l2=0.01, dtype="float32")
    extra = synthetic_classification(5, 6, 3, seed=1)
    api.unlearn(base, delete=[3, 4], add=Dataset(extra.X, extra.y, extra.ids + 1000),
                          out_cache=str(d / "c1"))  # 100 file rows + 5 added rows
    return d, data, open_cache(d / "c0"), open_cache(d / "c1")


def test_the_file_has_several_row_groups_and_read_rows_fingerprints_all_of_it(caches):
    import pyarrow.parquet as pq
    d, data, _, _ = caches
    assert pq.ParquetFile(d / "data.parquet").num_row_groups == 15
    part, n, fp = read_rows(d / "data.parquet", 10, 30, regression=False)
    assert n == 100 and fp == fingerprint(read_dataset(d / "data.parquet", regression=False))
    _same(part, read_dataset(d / "data.parquet").rows(torch.arange(10, 30)))


@pytest.mark.parametrize("start,stop", [(0, 0), (0, 100), (5, 23), (7, 14), (97, 100), (98, 103), (100, 105)])
def test_rows_equal_the_slice_of_the_whole_data(caches, start, stop):
    _, _, c0, c1 = caches
    for cache in (c0, c1):
        if stop > cache.n_rows:
            continue
        _same(cache.data_rows(start, stop), cache.data().rows(torch.arange(start, stop)))


def test_regression_targets_in_the_cache_dtype(tmp_path):
    data = synthetic_regression(40, 6, seed=2)
    write_dataset(data, tmp_path / "reg.parquet", row_group_bytes=5 * ROW_BYTES)
    cache = api.fit(str(tmp_path / "reg.parquet"), str(tmp_path / "c"), model="linear", steps=10, lr=0.1,
                    dtype="float32")
    _same(cache.data_rows(3, 31), cache.data().rows(torch.arange(3, 31)))


def test_other_data_is_refused_as_by_data(caches, tmp_path):
    d, data, c0, _ = caches
    other = Dataset(data.X + 1, data.y, data.ids)
    write_dataset(other, tmp_path / "other.parquet", row_group_bytes=7 * ROW_BYTES)
    with pytest.raises(InputError) as whole:
        c0.data(tmp_path / "other.parquet")
    with pytest.raises(InputError) as part:
        c0.data_rows(0, 10, tmp_path / "other.parquet")
    assert str(part.value) == str(whole.value) and "is not the data set the cache" in str(part.value)
    with pytest.raises(InputError, match=r"rows \[0, 106\) are not within the 100 rows of the cache"):
        c0.data_rows(0, 106)
