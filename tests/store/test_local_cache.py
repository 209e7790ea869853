"""The local trajectory cache: round trips, checksums, refusals."""

import json

import pytest
import torch

from deltagrad_ray import api
from deltagrad_ray.core import DeltaGradConfig, InputError, deltagrad, make_change_set, retrain
from deltagrad_ray.core import synthetic_classification, synthetic_regression
from deltagrad_ray.store import StorageError, load_model, open_cache, read_dataset, read_ids, write_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    data = synthetic_classification(1500, 8, 3, seed=0)
    write_dataset(data, d / "data.parquet")
    cache = api.fit(str(d / "data.parquet"), str(d / "c1"), model="logreg", optimizer="sgd", batch_size=500,
                    steps=60, lr=0.3, l2=0.01, shard_steps=7)
    return d, data, cache


def test_cache_round_trip_reproduces_the_in_memory_trajectory(trained):
    d, data, cache = trained
    assert len(cache.manifest.shards) == 9  # 60 steps, 7 per shard
    from deltagrad_ray.core import ModelSpec, learning_rates, train
    m = ModelSpec("logreg", 8, 3).build()
    mem = train(m, data, steps=60, lrs=learning_rates(60, 0.3), l2=0.01, batch_size=500, seed=0)
    stored = cache.trajectory().materialize()
    assert torch.equal(stored.params, mem.materialize().params)
    assert torch.equal(stored.grads, mem.materialize().grads)
    assert torch.equal(cache.final, mem.final)


def test_unlearn_from_storage_equals_in_memory_replay(trained):
    d, data, cache = trained
    change = make_change_set(data, delete_ids=torch.tensor([4, 8, 15]), n_classes=3)
    traj = cache.trajectory()
    mem = deltagrad(cache.model, traj, data, change, DeltaGradConfig())
    res = api.unlearn(cache, delete=[4, 8, 15])
    assert torch.equal(res.params, mem.params)
    exact = api.retrain_exact(cache, delete=[4, 8, 15])
    assert torch.equal(exact, retrain(cache.model, traj, data, change))
    # small SGD batches (500 of 1,500, d=8): accuracy is the core tests' business; here only a
    # check that the stored path moved the model towards the exact one
    assert float((res.params - exact).norm()) <= 0.25 * float((exact - cache.final).norm())


def test_corrupted_shard_is_detected(trained, tmp_path):
    d, _, cache = trained
    import shutil
    copy = tmp_path / "c1"
    shutil.copytree(d / "c1", copy)
    shard = copy / cache.manifest.shards[2].path
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match="checksum mismatch"):
        api.unlearn(str(copy), delete=[1], data=str(d / "data.parquet"))


def test_missing_shard_is_named(trained, tmp_path):
    d, _, cache = trained
    import shutil
    copy = tmp_path / "c1"
    shutil.copytree(d / "c1", copy)
    (copy / cache.manifest.shards[0].path).unlink()
    with pytest.raises(StorageError, match=r"part-00000-.*parquet: not found"):
        api.unlearn(str(copy), delete=[1], data=str(d / "data.parquet"))


def test_newer_format_version_is_refused(trained, tmp_path):
    d, _, _ = trained
    import shutil
    copy = tmp_path / "c1"
    shutil.copytree(d / "c1", copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StorageError, match="format version 99 is newer"):
        open_cache(str(copy))


def test_cache_made_from_other_data_is_refused(trained, tmp_path):
    d, data, _ = trained
    other = synthetic_classification(1500, 8, 3, seed=1)
    write_dataset(other, tmp_path / "other.parquet")
    with pytest.raises(InputError, match="is not the data set the cache .* was trained on"):
        api.unlearn(str(d / "c1"), delete=[1], data=str(tmp_path / "other.parquet"))


def test_existing_cache_is_never_overwritten(trained):
    d, _, cache = trained
    before = (d / "c1" / "manifest.json").read_bytes()
    with pytest.raises(StorageError, match="a trajectory cache already exists here"):
        api.fit(str(d / "data.parquet"), str(d / "c1"), steps=5, lr=0.1)
    assert (d / "c1" / "manifest.json").read_bytes() == before


def test_a_data_set_is_not_a_cache_and_a_cache_is_not_a_data_set(trained):
    d, _, _ = trained
    with pytest.raises(InputError, match="is not a trajectory cache"):
        open_cache(str(d / "data.parquet"))
    with pytest.raises(InputError, match="is a trajectory cache, not a data set"):
        read_dataset(str(d / "c1"))


def test_unfinished_cache_does_not_exist(trained, tmp_path):
    # a writer that died before the manifest leaves shards but no cache
    d, _, cache = trained
    import shutil
    copy = tmp_path / "c1"
    shutil.copytree(d / "c1", copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(StorageError, match="no committed manifest.json"):
        open_cache(str(copy))


def test_model_file_layout(trained, tmp_path):
    _, _, cache = trained
    from deltagrad_ray.store import save_model
    save_model(tmp_path / "m.safetensors", cache.model, cache.final, metadata={"k": 1})
    model, theta, meta = load_model(tmp_path / "m.safetensors")
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "m.safetensors")
    assert tensors["weight"].shape == (3, 8) and tensors["bias"].shape == (3,)
    assert torch.equal(theta, cache.final) and meta == {"k": 1}


def test_linear_model_files_use_weight_and_bias(tmp_path):
    data = synthetic_regression(200, 5, seed=0)
    write_dataset(data, tmp_path / "r.parquet")
    api.fit(str(tmp_path / "r.parquet"), str(tmp_path / "c"), model="linear", steps=20, lr=0.3)
    from safetensors.torch import load_file
    t = load_file(tmp_path / "c" / "model.safetensors")
    assert t["weight"].shape == (1, 5) and t["bias"].shape == (1,)
    assert set(api.evaluate(str(tmp_path / "c" / "model.safetensors"), str(tmp_path / "r.parquet"))) == {
        "n", "loss", "mse"}


def test_id_files(tmp_path):
    (tmp_path / "ids.txt").write_text("3\n\n# comment\n 7 \n")
    assert read_ids(tmp_path / "ids.txt").tolist() == [3, 7]
    (tmp_path / "bad.txt").write_text("3\nseven\n")
    with pytest.raises(InputError, match=r"bad.txt, line 2: 'seven' is not an integer id"):
        read_ids(tmp_path / "bad.txt")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": [5, 6]}), tmp_path / "ids.parquet")
    assert read_ids(tmp_path / "ids.parquet").tolist() == [5, 6]


def test_the_manifest_is_a_typed_value_that_round_trips(trained):
    from deltagrad_ray.store.manifest import Manifest
    _, _, cache = trained
    m = cache.manifest
    again = Manifest.from_dict(json.loads(m.to_json()))
    assert again == m
    assert m.training.learning_rates().tolist() == cache.lrs.tolist()
    assert m.model == cache.spec and m.steps == cache.steps == 60


def _edited_copy(d, tmp_path, edit, keep_digest: bool):
    import shutil
    copy = tmp_path / "edited"
    shutil.copytree(d / "c1", copy)
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    if not keep_digest:
        del m["training_digest"]  # whoever edits it can also drop (or recompute) the digest
    (copy / "manifest.json").write_text(json.dumps(m))
    return copy


@pytest.mark.parametrize("edit", [
    lambda m: m["optimizer"]["lr"].update(base=m["optimizer"]["lr"]["base"] * 2),
    lambda m: m.update(l2=m["l2"] * 3),
    lambda m: m["optimizer"]["lr"].update(milestones=[30], gamma=0.5),
], ids=["learning-rate", "l2", "schedule"])
def test_an_edited_manifest_is_refused_by_retraining_and_replay_alike(trained, tmp_path, edit):
    """The schedule has one source (the manifest) and the shards carry the digest of the settings
    they were written for: an edited manifest cannot make exact retraining and the replay follow
    different runs, nor silently retrain another one."""
    d, _, _ = trained
    with pytest.raises(StorageError, match="training settings do not match its own digest"):
        open_cache(str(_edited_copy(d, tmp_path / "a", edit, keep_digest=True)))
    copy = _edited_copy(d, tmp_path / "b", edit, keep_digest=False)
    for call in (lambda: api.retrain_exact(str(copy), delete=[1]), lambda: api.unlearn(str(copy), delete=[1])):
        with pytest.raises(StorageError, match="this shard was written for other training settings than the "
                                               "manifest states"):
            call()


def test_a_malformed_manifest_names_the_field(trained, tmp_path):
    d, _, _ = trained
    copy = _edited_copy(d, tmp_path, lambda m: m.pop("n_rows"), keep_digest=True)
    with pytest.raises(StorageError, match="malformed manifest .*missing field n_rows"):
        open_cache(str(copy))
    copy2 = _edited_copy(d, tmp_path / "x", lambda m: m.update(steps="sixty"), keep_digest=False)
    with pytest.raises(StorageError, match="field steps must be an integer, got 'sixty'"):
        open_cache(str(copy2))
