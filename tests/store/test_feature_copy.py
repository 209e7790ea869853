"""train --mmap-features: the features as a memory-mappable copy inside a local cache, used by later
loads only when it matches the data the cache was trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltagrad_ray import api
from deltagrad_ray.core import InputError, synthetic_classification
from deltagrad_ray.store import write_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("copy")
    data = synthetic_classification(600, 12, 3, seed=5)
    write_dataset(data, d / "train.parquet")
    plain = api.fit(str(d / "train.parquet"), str(d / "plain"), steps=40, lr=0.5, l2=0.01)
    mapped = api.fit(str(d / "train.parquet"), str(d / "mapped"), steps=40, lr=0.5, l2=0.01, mmap_features=True)
    return d, data, plain, mapped


def test_the_mapped_load_equals_the_parquet_load_and_so_do_replays(trained):
    d, data, plain, mapped = trained
    assert (d / "mapped" / "features.npy").is_file() and not (d / "plain" / "features.npy").exists()
    a, b = plain.data(), mapped.data()
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y) and torch.equal(a.ids, b.ids)
    b.X[0, 0] += 1.0  # copy-on-write: the file is not changed
    assert torch.equal(api.open_cache(str(d / "mapped")).data().X, a.X)
    gone = data.ids[:6].tolist()
    r1, r2 = api.unlearn(plain, delete=gone), api.unlearn(mapped, delete=gone)
    exact = api.retrain_exact(plain, delete=gone)
    assert torch.equal(r1.params, r2.params)
    assert (r2.params - exact).norm() < 0.05 * (exact - plain.final).norm()  # not a no-op


def test_a_copy_that_does_not_match_is_ignored_with_a_warning(trained, tmp_path):
    d, data, plain, _ = trained
    import shutil
    shutil.copytree(d / "mapped", tmp_path / "c")
    copy = tmp_path / "c" / "features.npy"
    X = np.load(copy)
    X[3, 4] += 1e-3
    np.save(copy, X)
    with pytest.warns(UserWarning, match="the feature copy does not match the data the cache was trained on"):
        got = api.open_cache(str(tmp_path / "c")).data()
    assert torch.equal(got.X, plain.data().X)  # read from the Parquet data instead
    np.save(copy, X[:10])
    with pytest.warns(UserWarning, match=r"features of shape \(10, 12\), expected \(600, d\)"):
        api.open_cache(str(tmp_path / "c")).data()


def test_refused_for_a_cache_on_s3(trained):
    d, *_ = trained
    with pytest.raises(InputError, match="--mmap-features needs a local cache"):
        api.fit(str(d / "train.parquet"), "s3://bucket/c", steps=5, lr=0.5, mmap_features=True)


def test_a_derived_cache_maps_its_ancestors_copy(trained, tmp_path):
    """A replay's cache (and so every erasure version) trains on the same data set: it maps the copy
    of the nearest cache up its lineage, verified against its own fingerprint, with no warning."""
    import warnings
    d, data, plain, mapped = trained
    gone = data.ids[:4].tolist()
    api.unlearn(mapped, delete=gone, out_cache=str(tmp_path / "v1"))
    api.unlearn(str(tmp_path / "v1"), delete=data.ids[4:6].tolist(), out_cache=str(tmp_path / "v2"))
    v2 = api.open_cache(str(tmp_path / "v2"))
    assert not (tmp_path / "v2" / "features.npy").exists()
    assert v2._feature_copy().path == str(d / "mapped" / "features.npy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = v2.data()
    want = plain.data()
    assert torch.equal(got.X, want.X) and torch.equal(got.ids, want.ids)
    # a lineage without a copy reads Parquet, as before
    api.unlearn(plain, delete=gone, out_cache=str(tmp_path / "p1"))
    assert api.open_cache(str(tmp_path / "p1"))._feature_copy() is None


def test_the_train_job_writes_a_copy_for_a_local_cache_by_default(tmp_path):
    from deltagrad_ray.jobs import train
    from deltagrad_ray.jobs.config import check
    write_dataset(synthetic_classification(200, 5, 2, seed=0), tmp_path / "data.parquet")
    for name, setting in (("auto", None), ("off", False)):
        cfg = check({"data": str(tmp_path / "data.parquet"), "cache": str(tmp_path / name),
                     "optimizer": {"steps": 5}, "features_copy": setting}, train.SCHEMA)
        train.run(cfg)
    assert (tmp_path / "auto" / "features.npy").is_file() and not (tmp_path / "off" / "features.npy").exists()
    with pytest.raises(InputError, match="features_copy must be true, false or null"):
        train.run(check({"data": str(tmp_path / "data.parquet"), "cache": str(tmp_path / "bad"),
                         "features_copy": "yes"}, train.SCHEMA))
