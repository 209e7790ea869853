"""Bulk erasure when the owner deletes the source rows too: run 1 erases ids, the source table is
rewritten without them, run 2 erases more and publishes; the receipt (``trace``) still works."""

from __future__ import annotations

import json

import torch

from deltagrad_ray import api, erasure
from deltagrad_ray.core import DeltaGradConfig, synthetic_classification
from deltagrad_ray.core.data import Dataset
from deltagrad_ray.erasure import Target, bulk_erasure
from deltagrad_ray.store import write_dataset

from .erasure_helpers import latest_cache

N = 600


def _requests(path, name, ids):
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text("\n".join(json.dumps({"request_id": f"{name}-{i}", "data_id": i,
                                                   "timestamp": "2026-12-01"}) for i in ids) + "\n")


def _run(tmp):
    return bulk_erasure(cache=str(tmp / "models" / "current"), requests=str(tmp / "requests"),
                        output=str(tmp / "models"), config=DeltaGradConfig(), verify={"sample": 1, "tolerance": 0.05})


def test_bulk_erasure_goes_on_after_the_source_table_is_rewritten(tmp_path):
    data = synthetic_classification(N, 10, 3, seed=4)
    src = tmp_path / "data.parquet"
    write_dataset(data, src)
    cache = api.fit(str(src), str(tmp_path / "models" / "current"), model="logreg", steps=60, lr=0.5, l2=0.01)
    first, second = list(range(0, 20, 2)), list(range(100, 110))
    exact = api.retrain_exact(cache, delete=first + second)  # the ground truth, from the original table

    _requests(tmp_path / "requests", "one.jsonl", first)
    (a1,) = _run(tmp_path)
    assert a1["deleted_ids"] == len(first)
    # the owner deletes the erased rows at the source
    keep = torch.nonzero(~torch.isin(data.ids, torch.tensor(first))).reshape(-1)
    write_dataset(Dataset(data.X[keep], data.y[keep], data.ids[keep]), src, overwrite=True)

    _requests(tmp_path / "requests", "two.jsonl", second + [first[0]])   # one id again: already erased
    (a2,) = _run(tmp_path)
    assert a2["deleted_ids"] == len(second)
    assert {r["status"] for r in a2["settled"] if r["data_id"] == first[0]} == {"already erased"}
    # verified against exact retraining (of the parent over the rewritten table: placeholders for `first`) …
    v = a2["verification"]
    assert v["performed"] and v["passed"] and v["ratio"] <= 0.05
    # … and against exact retraining on the original table without both runs' ids: within 5% of the distance
    # the deletions move the model (two chained replays; the version before run 2 is far outside it)
    new, moved = latest_cache(tmp_path / "models"), float((exact - cache.final).norm())
    assert float((new.final - exact).norm()) <= 0.05 * moved
    assert new.manifest.data.uri == cache.manifest.data.uri and "rows.parquet" in new.manifest.files

    # the receipt: version 0 (trained on the original table) still holds the id, the others do not, and the
    # training data no longer does
    receipt = erasure.trace([Target("m", str(tmp_path / "models"))], data_id=first[1])
    (row,) = receipt["models"]
    assert "error" not in row, row
    assert row["held"] and not row["latest_holds"] and row["erased"]["version"] == 1
    assert row["survives_in"] == [0] and row["training_data_holds"] is False
    row = erasure.trace([Target("m", str(tmp_path / "models"))], data_id=second[0])["models"][0]
    assert "error" not in row and row["erased"]["version"] == 2 and sorted(row["survives_in"]) == [0, 1]
    assert row["training_data_holds"] is True
