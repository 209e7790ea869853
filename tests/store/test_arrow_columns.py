"""Columns in and out of Arrow without pyarrow's converters (they import pandas: 0.1-0.3 s of every
job's start-up): the buffer-level copies must give what ``to_numpy`` / ``pa.array`` give, on chunked
and sliced columns of every numeric type, and fall back to them for everything else."""

from __future__ import annotations

import subprocess

import numpy as np
import pyarrow as pa
import pytest
import torch

from deltagrad_ray.store.datasets import arrow_array, numpy_column
from tests.processes import python

NUMERIC = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"]


@pytest.mark.parametrize("dtype", NUMERIC)
def test_numpy_column_equals_to_numpy_on_chunked_sliced_columns(dtype):
    rng = np.random.default_rng(0)
    parts = [(rng.standard_normal(n) * 50).astype(dtype) for n in (7, 0, 13, 5)]
    col = pa.chunked_array([pa.array(p) for p in parts]).slice(3, 17)  # offsets inside the chunks
    assert any(c.offset for c in col.chunks)
    got, want = numpy_column(col), np.asarray(col.to_numpy())
    assert got.dtype == want.dtype and got.flags.writeable and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    single = pa.array(parts[2]).slice(4, 6)
    np.testing.assert_array_equal(numpy_column(single), single.to_numpy(zero_copy_only=False))
    got[:] = 0  # a copy: the Arrow data is untouched
    np.testing.assert_array_equal(np.asarray(col.to_numpy()), want)


def test_numpy_column_falls_back_for_nulls_booleans_and_strings():
    with_null = pa.chunked_array([pa.array([1.0, None, 3.0])])
    assert np.isnan(numpy_column(with_null)[1])
    np.testing.assert_array_equal(numpy_column(pa.array([True, False])), [True, False])
    assert list(numpy_column(pa.chunked_array([pa.array(["a", "b"])]))) == ["a", "b"]


@pytest.mark.parametrize("dtype", NUMERIC)
def test_arrow_array_equals_pa_array(dtype):
    a = (np.random.default_rng(1).standard_normal(11) * 50).astype(dtype)
    assert arrow_array(a).equals(pa.array(a))
    strided = a[::2]  # not contiguous: copied first
    assert arrow_array(strided).equals(pa.array(strided))
    t = torch.arange(6, dtype=torch.float64)
    assert arrow_array(t).equals(pa.array(t.numpy()))
    assert arrow_array(np.array([True, False])).equals(pa.array([True, False]))  # falls back


def test_reading_a_data_set_and_writing_a_shard_import_no_pandas(tmp_path):
    """The job's own reads and writes (ids, labels, features, a trajectory shard, rows and removed
    files): none of them may import pandas (it would cost every job's start-up again)."""
    code = f"""
import sys
import numpy as np, torch
from deltagrad_ray.core import synthetic_classification
from deltagrad_ray.store.datasets import read_dataset, read_id_column, read_ids_labels, write_dataset
from deltagrad_ray.store.cache_format import shard_bytes
from deltagrad_ray.store.cache_writer import removed_rows_file, row_digest_file
assert "pandas" not in sys.modules, "imported with the modules"
data = synthetic_classification(50, 4, 3, seed=0)
write_dataset(data, {str(tmp_path / 'd.parquet')!r})
back = read_dataset({str(tmp_path / 'd.parquet')!r})
assert torch.equal(back.X, data.X) and torch.equal(back.y, data.y) and torch.equal(back.ids, data.ids)
ids = read_id_column({str(tmp_path / 'd.parquet')!r}); ids2, y = read_ids_labels({str(tmp_path / 'd.parquet')!r})
assert np.array_equal(ids, data.ids.numpy()) and torch.equal(y, data.y)
shard_bytes(0, torch.zeros(3, 5), torch.ones(3, 5), np.full(3, 0.1), 2)
row_digest_file(data); removed_rows_file(torch.tensor([1, 2]), torch.tensor([7, 9]))
print("pandas" in sys.modules)
"""
    out = subprocess.run(python("-c", code), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", "pandas was imported on the job's path"
