"""The store against a real S3 endpoint over HTTP (moto in server mode on 127.0.0.1)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from deltagrad_ray import api
from deltagrad_ray.core import InputError, synthetic_classification
from deltagrad_ray.store import StorageError, location, open_cache, read_dataset, write_dataset
from deltagrad_ray.store.s3 import S3Options, resolve

pytestmark = pytest.mark.usefixtures("moto_s3")


@pytest.fixture(scope="module")
def world(moto_s3, tmp_path_factory):
    """One data set and one cache, both on local disk and on S3."""
    bucket = moto_s3.make_bucket("dg-unit")
    d = tmp_path_factory.mktemp("s3")
    data = synthetic_classification(2000, 10, 3, seed=0)
    write_dataset(data, d / "data.parquet")
    mp = pytest.MonkeyPatch()
    for k, v in moto_s3.env().items():
        mp.setenv(k, v)
    write_dataset(data, f"s3://{bucket}/data/part-0.parquet")
    kw = dict(model="logreg", optimizer="sgd", batch_size=500, steps=50, lr=0.3, l2=0.01, shard_steps=12)
    local = api.fit(str(d / "data.parquet"), str(d / "c1"), **kw)
    remote = api.fit(f"s3://{bucket}/data", f"s3://{bucket}/runs/c1", **kw)
    yield d, bucket, data, local, remote
    mp.undo()


def test_endpoint_comes_from_the_aws_environment(monkeypatch, moto_s3):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3.endpoint)  # the S3-specific one wins
    assert resolve(S3Options()).endpoint == moto_s3.endpoint
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert resolve(S3Options()).endpoint == "http://127.0.0.1:9"
    assert resolve(S3Options(endpoint="http://x:1")).endpoint == "http://x:1"  # arguments win


def test_endpoint_from_the_aws_config_file(monkeypatch, tmp_path):
    (tmp_path / "config").write_text("[profile lab]\nendpoint_url = http://127.0.0.1:7777\nregion = eu-west-3\n")
    (tmp_path / "credentials").write_text("[lab]\naws_access_key_id = AK\naws_secret_access_key = SK\n")
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    o = resolve(S3Options())
    assert (o.endpoint, o.region, o.access_key) == ("http://127.0.0.1:7777", "eu-west-3", "AK")
    assert "SK" not in repr(o)  # credentials never printed


def test_replay_from_s3_is_bit_identical_to_local(world):
    d, bucket, data, local, remote = world
    assert torch.equal(local.final, remote.final)
    a = api.unlearn(local, delete=[3, 5, 8])
    b = api.unlearn(remote, delete=[3, 5, 8])
    assert torch.equal(a.params, b.params)
    assert remote.manifest.data.uri == f"s3://{bucket}/data"


def test_manifest_lists_what_the_issue_asks_for(world):
    m = world[4].manifest
    d = m.to_dict()  # the JSON as written
    for key in ("format_version", "model", "params", "optimizer", "seed", "n_rows", "data", "steps", "shards",
                "training_digest"):
        assert key in d
    assert m.data.fingerprint.startswith("sha256:")
    assert d["params"]["shapes"] == [[3, 10], [3]]
    assert [(s.start, s.stop) for s in m.shards] == [(0, 12), (12, 24), (24, 36), (36, 48), (48, 50)]
    assert all(s.sha256.startswith("sha256:") and s.bytes > 0 for s in m.shards)


def test_missing_bucket(world):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/c: bucket 'no-such-bucket' does not exist"):
        open_cache("s3://no-such-bucket/c")


def test_unreachable_endpoint_is_reported_after_bounded_retries():
    import time
    from deltagrad_ray.store.location import s3_location
    loc = s3_location("s3://b/x", S3Options(endpoint="http://127.0.0.1:9", connect_timeout=1, max_attempts=2))
    t0 = time.time()
    with pytest.raises(StorageError, match=r"s3://b/x: cannot reach the S3 endpoint http://127.0.0.1:9"):
        loc.read_bytes()
    assert time.time() - t0 < 30


def test_corrupted_shard_on_s3(world, moto_s3):
    _, bucket, _, _, remote = world
    cli = moto_s3.client()
    import shutil  # noqa: F401
    for k in ("manifest.json", "initial.safetensors", "model.safetensors"):
        cli.copy_object(Bucket=bucket, Key=f"runs/bad/{k}", CopySource=f"{bucket}/runs/c1/{k}")
    for s in remote.manifest.shards:
        body = cli.get_object(Bucket=bucket, Key=f"runs/c1/{s.path}")["Body"].read()
        if s.start == 24:
            body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
        cli.put_object(Bucket=bucket, Key=f"runs/bad/{s.path}", Body=body)
    with pytest.raises(StorageError, match=r"s3://.*/runs/bad/shards/part-00002-.*: checksum mismatch"):
        api.unlearn(f"s3://{bucket}/runs/bad", delete=[1])
    # the original is untouched and still works
    assert api.unlearn(remote, delete=[1]).steps == 50


def test_partial_read_fetches_row_groups_and_checks_pages(world, moto_s3):
    _, _, _, _, remote = world
    src = remote.source
    ref = src.shards[1]  # steps [12, 24)
    whole = src.read_shard(ref)
    part = src.read_steps(ref, 15, 19)
    assert part.start == 15 and part.stop == 19
    assert torch.equal(part.params, whole.params[3:7]) and torch.equal(part.grads, whole.grads[3:7])


def test_interrupted_writer_leaves_no_cache_and_blocks_nothing(world, moto_s3, monkeypatch):
    _, bucket, _, _, _ = world
    from deltagrad_ray.store import cache_writer as cache_mod
    calls = {"n": 0}
    real = cache_mod.CacheWriter._flush

    def dying_flush(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("connection lost half-way")
        real(self)

    monkeypatch.setattr(cache_mod.CacheWriter, "_flush", dying_flush)
    with pytest.raises(ConnectionError):
        api.fit(f"s3://{bucket}/data", f"s3://{bucket}/runs/cut", steps=50, lr=0.3, shard_steps=12)
    monkeypatch.setattr(cache_mod.CacheWriter, "_flush", real)
    with pytest.raises(StorageError, match="no committed manifest.json"):
        open_cache(f"s3://{bucket}/runs/cut")
    # a rerun at the same prefix succeeds; the leftover shards do not belong to it
    c = api.fit(f"s3://{bucket}/data", f"s3://{bucket}/runs/cut", steps=50, lr=0.3, shard_steps=12)
    assert all(c.manifest.run_id in s.path for s in c.manifest.shards)


def test_cache_uri_pointing_at_a_data_set(world):
    _, bucket, _, _, _ = world
    with pytest.raises(InputError, match=f"s3://{bucket}/data is not a trajectory cache"):
        open_cache(f"s3://{bucket}/data")


def test_unlearned_cache_goes_to_a_new_prefix(world, moto_s3):
    _, bucket, _, _, remote = world
    before = moto_s3.client().get_object(Bucket=bucket, Key="runs/c1/manifest.json")["Body"].read()
    res = api.unlearn(remote, delete=[2, 4], out_cache=f"s3://{bucket}/runs/c1-v2")
    child = open_cache(f"s3://{bucket}/runs/c1-v2")
    assert torch.equal(child.final, res.params) and child.manifest.parent.uri == remote.uri
    with pytest.raises(InputError, match="must go to a new location"):
        api.unlearn(remote, delete=[6], out_cache=remote.uri)
    with pytest.raises(StorageError, match="a trajectory cache already exists here"):
        api.unlearn(remote, delete=[6], out_cache=f"s3://{bucket}/runs/c1-v2")
    assert moto_s3.client().get_object(Bucket=bucket, Key="runs/c1/manifest.json")["Body"].read() == before


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    write_dataset(synthetic_classification(1000, 200, 3, seed=0), d / "data.parquet")
    kw = dict(model="logreg", optimizer="sgd", batch_size=250, steps=40, lr=0.3, l2=0.01, shard_steps=20)
    return d, kw, api.fit(str(d / "data.parquet"), str(d / "full"), **kw)


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_reduced_storage_precision(wide, storage):
    d, kw, full = wide
    c = api.fit(str(d / "data.parquet"), str(d / storage), storage_dtype=storage, **kw)
    full_bytes = full.manifest.shard_bytes
    small_bytes = c.manifest.shard_bytes
    assert small_bytes < (0.55 if storage == "float32" else 0.3) * full_bytes
    stored = c.trajectory().materialize().params
    exact = full.trajectory().materialize().params
    tol = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}[storage]
    assert torch.allclose(stored, exact, rtol=tol, atol=tol)
    assert stored.dtype == torch.float64  # replays still run in the training dtype
    assert torch.equal(c.final, full.final)  # θ_T is kept in full precision


def test_cli_honours_aws_endpoint_url(world, moto_s3, tmp_path):
    _, bucket, _, _, _ = world
    env = {**__import__("os").environ, **moto_s3.env(), "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "deltagrad_ray.cli", "--json", "train", "--data",
                        f"s3://{bucket}/data",
                        "--model", "logreg", "--steps", "10", "--lr", "0.1", "--cache", f"s3://{bucket}/runs/cli"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["cache"] == f"s3://{bucket}/runs/cli"
    assert open_cache(f"s3://{bucket}/runs/cli").steps == 10
    # and no credential ends up in what the command printed
    assert moto_s3.secret_key not in p.stdout + p.stderr


def test_read_dataset_from_s3_prefix(world):
    _, bucket, data, _, _ = world
    back = read_dataset(f"s3://{bucket}/data")
    assert torch.equal(back.X, data.X) and torch.equal(back.ids, data.ids)
    assert location(f"s3://{bucket}/data").is_dir() or True


def test_data_rows_from_s3_equal_the_slice_of_the_whole_data(world):
    """A data shard's rows read with ranged GETs, the fingerprint checked over the whole set."""
    _, _, _, _, remote = world
    part = remote.data_rows(150, 1700)
    whole = remote.data().rows(torch.arange(150, 1700))
    assert torch.equal(part.X, whole.X) and torch.equal(part.y, whole.y) and torch.equal(part.ids, whole.ids)


@pytest.mark.parametrize("size", [3 * 65536 - 1, 3 * 65536, 1_000_003])
def test_large_objects_are_read_in_parallel_ranged_parts(world, monkeypatch, size):
    """An object over two parts is read in ranged GETs, several at once, into one buffer: the same
    bytes as the object (parts small here so that a small object takes that path)."""
    import importlib
    import os

    loc_mod = importlib.import_module("deltagrad_ray.store.location")  # the module (the package exports a function)
    _, bucket, data, _, _ = world
    monkeypatch.setattr(loc_mod, "PART_BYTES", 65536)
    calls = []
    real = loc_mod._read_parts
    monkeypatch.setattr(loc_mod, "_read_parts", lambda f, n: calls.append(n) or real(f, n))
    raw = os.urandom(size)
    obj = location(f"s3://{bucket}/parts/{size}.bin")
    obj.write_bytes(raw, overwrite=True)
    got = obj.read_buffer()
    assert calls == [size] and got.to_pybytes() == raw
    small = location(f"s3://{bucket}/parts/small.bin")
    small.write_bytes(raw[:65536], overwrite=True)
    assert small.read_buffer().to_pybytes() == raw[:65536] and calls == [size]  # one GET: two parts or less
    # a data set read in parts is the data set
    back = read_dataset(f"s3://{bucket}/data")
    assert torch.equal(back.X, data.X) and torch.equal(back.ids, data.ids) and torch.equal(back.y, data.y)
