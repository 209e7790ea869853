"""Bulk erasure: exactly once, resumable after a kill at any point, nothing lost, audited."""

from __future__ import annotations

import json

import pytest
import torch

from deltagrad_ray import api, erasure
from deltagrad_ray.core import DeltaGradConfig, synthetic_classification
from deltagrad_ray.erasure import Registry, bulk_erasure
from deltagrad_ray.store import StorageError, open_cache, write_dataset

from .erasure_helpers import applied_once, latest_cache, settled

N = 2000


@pytest.fixture
def world(tmp_path):
    data = synthetic_classification(N, 12, 3, seed=0)
    write_dataset(data, tmp_path / "data.parquet")
    cache = api.fit(str(tmp_path / "data.parquet"), str(tmp_path / "models" / "current"), model="logreg",
                    steps=60, lr=0.5, l2=0.01)
    return tmp_path, data, cache


def _write_requests(path, rows, name="batch.jsonl"):
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in rows) + "\n")


def _run(tmp, **kw):
    return bulk_erasure(cache=str(tmp / "models" / "current"), requests=str(tmp / "requests"),
                        output=str(tmp / "models"), config=DeltaGradConfig(), verify={"sample": 1, "tolerance": 0.05},
                        **kw)


def _snapshot(cache_dir):
    return {p.name: p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()}


def test_requests_are_validated_applied_and_audited(world):
    tmp, data, cache = world
    before = _snapshot(tmp / "models" / "current")
    good = [{"request_id": f"r{i}", "data_id": i, "timestamp": "2026-11-22"} for i in range(10)]
    _write_requests(tmp / "requests", good + [
        '{"request_id": "broken", "data_id": ',                       # malformed JSON
        {"request_id": "r-unknown", "data_id": 10 ** 6},              # unknown id
        {"request_id": "r0", "data_id": 0},                           # duplicate request
        {"request_id": "r-same-id", "data_id": 3},                    # same data id, another request
        {"data_id": 5}])                                              # no request_id
    (tmp / "requests" / "garbage.parquet").write_bytes(b"not parquet")
    audits = _run(tmp)
    assert len(audits) == 1
    a = audits[0]
    assert a["requests"]["applied"] == 11 and a["deleted_ids"] == 10
    fate = {(r["request_id"], r["source"]): (r["status"], r["reason"]) for r in a["settled"]}
    assert fate[("r-unknown", "batch.jsonl#11")] == ("not present",
                                                     "data_id 1000000 is not in this model's training data")
    assert fate[("r0", "batch.jsonl#12")][0] == "duplicate"             # the same (request, data id) again
    assert fate[("r-same-id", "batch.jsonl#13")] == ("applied", None)   # another request for the same row
    assert fate[(None, "batch.jsonl#10")][0] == "rejected" and "not JSON" in fate[(None, "batch.jsonl#10")][1]
    assert fate[(None, "batch.jsonl#14")] == ("rejected", "missing request_id")
    # a file that cannot be read is reported, not skipped
    assert any(f == "garbage.parquet" and "not a readable Parquet file" in w
               for f, w in erasure.read_inbox(tmp / "requests").not_read)
    # DeltaGrad was verified against exact retraining and published
    v = a["verification"]
    assert v["performed"] and v["passed"] and v["ratio"] <= 0.05 and v["dist_exact_parent"] > 0
    new = latest_cache(tmp / "models")
    exact = api.retrain_exact(cache, delete=list(range(10)))
    assert float((new.final - exact).norm()) <= 0.05 * float((exact - cache.final).norm())
    # the previous version is untouched and still loads
    assert _snapshot(tmp / "models" / "current") == before
    assert torch.equal(open_cache(tmp / "models" / "current").final, cache.final)
    # every request is settled once; a second run does nothing
    ledger = settled(tmp / "models")
    assert len(ledger) == 12  # 13 well-formed rows (two more malformed), one of them a duplicate of r0
    assert ledger[("r0", 0)].status == "applied"
    assert _run(tmp) == []


def test_second_batch_builds_on_the_first_and_settles_ids_already_erased(world):
    tmp, data, cache = world
    _write_requests(tmp / "requests", [{"request_id": f"a{i}", "data_id": i} for i in range(5)], "one.jsonl")
    _run(tmp)
    _write_requests(tmp / "requests", [{"request_id": "b0", "data_id": 3},
                                       {"request_id": "b1", "data_id": 100}], "two.jsonl")
    a = _run(tmp)[0]
    assert a["parent"]["version"] == 1 and a["new"]["version"] == 2
    assert [(r["status"], r["reason"]) for r in a["settled"] if r["status"] != "applied"] == [
        ("already erased", "data_id 3 was erased in an earlier version")]
    v2 = latest_cache(tmp / "models")
    exact = api.retrain_exact(cache, delete=[0, 1, 2, 3, 4, 100])
    assert float((v2.final - exact).norm()) <= 0.05 * float((exact - cache.final).norm())


STAGES = ["replay", "verify", "publish", "ledger"]


@pytest.mark.parametrize("stage", STAGES)
def test_killed_at_any_stage_and_rerun_applies_every_request_exactly_once(world, monkeypatch, stage):
    tmp, data, cache = world
    _write_requests(tmp / "requests", [{"request_id": f"r{i}", "data_id": 2 * i} for i in range(20)])
    before = _snapshot(tmp / "models" / "current")

    class Killed(Exception):
        pass

    def die(*a, **k):
        raise Killed(stage)

    from deltagrad_ray.erasure import run
    targets = {"replay": (api, "unlearn"), "verify": (run, "_verify"),
               "publish": (Registry, "publish"), "ledger": (erasure.Ledger, "write")}
    obj, name = targets[stage]
    real = getattr(obj, name)
    monkeypatch.setattr(obj, name, die)
    with pytest.raises(Killed):
        _run(tmp)
    monkeypatch.setattr(obj, name, real)
    audits = _run(tmp)  # the rerun finishes the open plan
    assert len(audits) == 1 and audits[0]["requests"]["applied"] == 20
    assert sorted(applied_once(tmp / "models")) == sorted(f"r{i}" for i in range(20))
    latest = Registry(tmp / "models").latest()
    assert latest.version == 1
    assert len(list((tmp / "models" / "plans").iterdir())) == 1  # one plan, not two
    assert _snapshot(tmp / "models" / "current") == before
    assert _run(tmp) == []  # nothing pending any more
    exact = api.retrain_exact(cache, delete=[2 * i for i in range(20)])
    assert float((latest_cache(tmp / "models").final - exact).norm()) <= 0.05 * float((exact - cache.final).norm())


def test_failed_verification_publishes_the_exact_retraining(world):
    tmp, data, cache = world
    _write_requests(tmp / "requests", [{"request_id": "x", "data_id": 7}])
    a = bulk_erasure(cache=str(tmp / "models" / "current"), requests=str(tmp / "requests"),
                     output=str(tmp / "models"), verify={"sample": 1, "tolerance": 0.0})[0]
    assert not a["verification"]["passed"] and a["new"]["method"] == "exact-retrain"
    published = latest_cache(tmp / "models")
    assert torch.equal(published.final, api.retrain_exact(cache, delete=[7]))
    # the exact cache can be replayed from, like any other
    assert published.steps == cache.steps and int(published.removed_mask().sum()) == 1


def test_missing_cache_is_a_clear_storage_error_and_nothing_is_written(tmp_path):
    _write_requests(tmp_path / "requests", [{"request_id": "x", "data_id": 7}])
    with pytest.raises(StorageError, match="no trajectory cache here"):
        bulk_erasure(cache=str(tmp_path / "nowhere"), requests=str(tmp_path / "requests"),
                     output=str(tmp_path / "models"))
    assert not (tmp_path / "models" / "ledger").exists() and not (tmp_path / "models" / "plans").exists()


def test_every_deltagrad_setting_reaches_the_published_model(world):
    """Non-default settings given in the pipeline's config are the settings of the replay: the
    published model is bit-identical to `unlearn` with the same settings (and differs from the
    defaults' model, so the test would fail if a setting were dropped)."""
    import yaml

    from pipelines import bulk_erasure as pipeline
    from pipelines._config import load
    tmp, data, cache = world
    ids = [3, 17, 250, 1999]
    _write_requests(tmp / "requests", [{"request_id": f"r{i}", "data_id": i} for i in ids])
    settings = {"period": 7, "burn_in": 4, "history": 3, "sigma": "yy/sy", "curvature_guard": 5,
                "curvature_eps": 1e-8}
    (tmp / "be.yaml").write_text(yaml.safe_dump({
        "cache": str(tmp / "models" / "current"), "requests": str(tmp / "requests"), "output": str(tmp / "models"),
        "deltagrad": settings, "verify": {"sample": 0},
        # no reconcile: on this small model the certified drift can exceed the default max_drift,
        # and a reconciled version is the exact retraining, not the replay under test
        "reconcile": {"max_drift": None, "every_versions": None}}))
    out = pipeline.run(load(str(tmp / "be.yaml"), pipeline.SCHEMA))
    assert out["applied"] == 4
    published = latest_cache(tmp / "models")
    cfg = DeltaGradConfig.from_dict(settings)
    same = api.unlearn(cache, delete=ids, config=cfg)
    assert torch.equal(published.final, same.params)
    assert not torch.equal(published.final, api.unlearn(cache, delete=ids).params)
    assert published.manifest.changes[-1]["config"] == cfg.to_dict()


def test_an_unknown_deltagrad_setting_in_the_config_is_refused(tmp_path):
    import yaml

    from deltagrad_ray.core import InputError
    from pipelines import bulk_erasure as pipeline
    from pipelines._config import load
    (tmp_path / "be.yaml").write_text(yaml.safe_dump({"cache": "c", "requests": "r", "output": "o",
                                                      "deltagrad": {"sigma": "yy/sy", "colour": 1}}))
    with pytest.raises(InputError, match="config: unknown key deltagrad.colour; expected one of"):
        load(str(tmp_path / "be.yaml"), pipeline.SCHEMA)
