"""The store against a real S3-compatible server: SeaweedFS (`weed mini`) on 127.0.0.1."""

from __future__ import annotations

import pytest
import torch

from deltagrad_ray import api
from deltagrad_ray.core import synthetic_classification
from deltagrad_ray.store import StorageError, open_cache, write_dataset
from deltagrad_ray.store.location import s3_location
from deltagrad_ray.store.s3 import S3Options

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def seaweed_world(seaweed_s3, tmp_path_factory):
    bucket = seaweed_s3.make_bucket("dg-integration")
    mp = pytest.MonkeyPatch()
    for k, v in seaweed_s3.env().items():
        mp.setenv(k, v)
    from deltagrad_ray.store import s3
    mp.setattr(s3, "_configured", s3.S3Options())
    d = tmp_path_factory.mktemp("sw")
    # p = 7,850 (MNIST-shaped logistic regression) so shards exceed the multipart threshold
    data = synthetic_classification(3000, 784, 10, seed=0)
    write_dataset(data, d / "data.parquet")
    write_dataset(data, f"s3://{bucket}/data/part-0.parquet")
    kw = dict(model="logreg", optimizer="gd", steps=60, lr=0.1, l2=0.005, shard_steps=50)
    local = api.fit(str(d / "data.parquet"), str(d / "c"), **kw)
    remote = api.fit(f"s3://{bucket}/data", f"s3://{bucket}/runs/c", **kw)
    yield seaweed_s3, bucket, local, remote
    mp.undo()


def test_seaweedfs_replay_is_bit_identical_to_local(seaweed_world):
    _, bucket, local, remote = seaweed_world
    assert remote.manifest.shards[0].bytes > 5 << 20  # went through a multipart upload
    ids = list(range(0, 3000, 100))
    a, b = api.unlearn(local, delete=ids), api.unlearn(remote, delete=ids)
    assert torch.equal(a.params, b.params)
    exact = api.retrain_exact(remote, delete=ids)
    assert float((b.params - exact).norm()) <= 0.05 * float((exact - remote.final).norm())


def test_seaweedfs_derived_cache_and_reopen(seaweed_world):
    _, bucket, _, remote = seaweed_world
    res = api.unlearn(remote, delete=[1, 2], out_cache=f"s3://{bucket}/runs/c-v2")
    child = open_cache(f"s3://{bucket}/runs/c-v2")
    assert torch.equal(child.final, res.params)
    assert int(child.removed_mask().sum()) == 2


def test_seaweedfs_wrong_credentials(seaweed_world):
    server, bucket, _, _ = seaweed_world
    loc = s3_location(f"s3://{bucket}/runs/c/manifest.json",
                      S3Options(endpoint=server.endpoint, access_key=server.access_key, secret_key="wrong"))
    with pytest.raises(StorageError, match=r"access denied by http://127.0.0.1:\d+; check the credentials"):
        loc.read_bytes()


def test_seaweedfs_missing_bucket(seaweed_world):
    with pytest.raises(StorageError, match="no-such-bucket"):
        open_cache("s3://no-such-bucket/x")
