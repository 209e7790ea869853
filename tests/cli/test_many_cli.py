"""loo / jackknife / influence / conformal from the command line."""

from __future__ import annotations

import pytest
import torch

from deltagrad_ray.datasets import sklearn_dataset, train_test_split
from deltagrad_ray.results import read_table
from deltagrad_ray.store import write_dataset

from .test_cli import ok, run
from ..processes import assert_same_across_processes


@pytest.fixture(scope="module")
def bc(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    train_rows, test_rows = train_test_split(sklearn_dataset("breast_cancer"), 200, n_test=60)
    write_dataset(train_rows, d / "train.parquet")
    write_dataset(test_rows, d / "test.parquet")
    ok("train", "--data", "train.parquet", "--model", "logreg", "--steps", "100", "--lr", "0.5", "--l2", "0.001",
       "--cache", "c", cwd=d)
    (d / "ids.txt").write_text("\n".join(str(int(i)) for i in train_rows.ids[:10]))
    return d


def test_loo_writes_one_row_per_id(bc):
    out = ok("loo", "--cache", "c", "--ids", "ids.txt", "--batch-size", "4", "--out", "loo.parquet", cwd=bc)
    table, _ = read_table(bc / "loo.parquet")
    assert table.column_names == ["id", "params", "explicit_steps", "approx_steps", "fallbacks", "error_estimate",
                                  "error_reliable", "method", "error"]
    assert table.column("method").to_pylist() == ["deltagrad"] * 10 and all(table.column("error_reliable").to_pylist())
    assert out["error_estimate_max"] == pytest.approx(max(table.column("error_estimate").to_pylist()), rel=1e-3)
    assert table.column("error").null_count == table.num_rows  # nothing failed
    assert table.column("id").to_pylist() == [int(x) for x in (bc / "ids.txt").read_text().split()]
    assert table.column("params").type.list_size == 62 and out["requests"] == 10


def test_loo_models_beyond_max_model_mb_are_streamed_into_out(bc):
    """--max-model-mb 0: no model is held on the driver; --out is written from the parts a row group at a
    time (16 KB chunks: several row groups) and holds the same models as the in-memory run."""
    ok("loo", "--cache", "c", "--ids", "ids.txt", "--batch-size", "3", "--out", "held.parquet", cwd=bc)
    out = ok("loo", "--cache", "c", "--ids", "ids.txt", "--batch-size", "3", "--max-model-mb", "0",
             "--out", "streamed.parquet", cwd=bc)
    held, _ = read_table(bc / "held.parquet")
    streamed, _ = read_table(bc / "streamed.parquet")
    assert out["requests"] == 10 and not (bc / "streamed.parquet.parts").exists()
    assert streamed.column("id").to_pylist() == held.column("id").to_pylist()
    # two command runs, two processes: to round-off (tests/processes.py)
    assert_same_across_processes(torch.tensor(streamed.column("params").to_pylist()),
                                 torch.tensor(held.column("params").to_pylist()))
    assert streamed.column("explicit_steps").to_pylist() == held.column("explicit_steps").to_pylist()
    assert torch.allclose(torch.tensor(streamed.column("error_estimate").to_pylist()),
                          torch.tensor(held.column("error_estimate").to_pylist()), rtol=1e-6, atol=0)


def test_streamed_table_is_written_in_row_groups(tmp_path):
    import pyarrow.parquet as pq

    from deltagrad_ray.results import write_table
    from deltagrad_ray.stats import TensorTable
    params = torch.randn(50, 40, dtype=torch.float64)
    write_table(tmp_path / "t.parquet", {"id": torch.arange(50), "params": TensorTable(params),
                                         "error": [None] * 50}, chunk_bytes=40 * 8 * 7, metadata={"k": 1})
    f = pq.ParquetFile(tmp_path / "t.parquet")
    assert f.metadata.num_row_groups == 8  # 7 rows each, the last 1
    table, meta = read_table(tmp_path / "t.parquet")
    assert meta == {"k": 1} and table.column("id").to_pylist() == list(range(50))
    assert torch.tensor(table.column("params").to_pylist(), dtype=torch.float64).equal(params)


def test_conformal_sets_in_test_order(bc):
    ok("conformal", "--cache", "c", "--test", "test.parquet", "--alpha", "0.1", "--out", "conf.parquet", cwd=bc)
    table, meta = read_table(bc / "conf.parquet")
    test_ids = sklearn_dataset("breast_cancer").ids[torch.randperm(569, generator=torch.Generator().manual_seed(0))
                                                    [200:260]].tolist()
    assert table.column("id").to_pylist() == test_ids
    # set_certain: logreg with reliable error estimates states which sets are the exact refits' (README)
    assert set(table.column_names) == {"id", "prediction", "set", "set_certain"}
    assert all(set(s) <= {0, 1} for s in table.column("set").to_pylist())
    assert meta["method"] == "jackknife+" and meta["calibration"] == 200
    assert meta["sets_certain"] == pytest.approx(sum(table.column("set_certain").to_pylist()) / 60, abs=1e-3)


def test_jackknife_and_influence(bc):
    out = ok("jackknife", "--cache", "c", "--test", "test.parquet", "--ids", "ids.txt", "--out", "jk.parquet", cwd=bc)
    assert out["test_loss"]["se"] > 0
    table, meta = read_table(bc / "jk.parquet")
    assert {"id", "estimate", "bias_corrected", "se"} <= set(table.column_names)
    ok("influence", "--cache", "c", "--test", "test.parquet", "--ids", "ids.txt", "--out", "inf.parquet", cwd=bc)
    table, _ = read_table(bc / "inf.parquet")
    assert table.num_rows == 10


@pytest.mark.parametrize("args,message", [
    (["conformal", "--alpha", "1.5"], "argument --alpha: must be a finite number in (0, 1), got '1.5'"),
    (["conformal", "--method", "cv+", "--folds", "1"], "argument --folds: must be an integer >= 2, got '1'"),
    (["conformal", "--method", "cv+", "--folds", "500"], "K must be an integer with 2 <= K <= 200"),
    (["conformal", "--ids", "bad-ids.txt"], "unknown ids (not in the data): 424242"),
])
def test_many_bad_input(bc, args, message):
    (bc / "bad-ids.txt").write_text("424242\n")
    p = run(*args[:1], "--cache", "c", "--test", "test.parquet", *args[1:], "--out", "bad.parquet", cwd=bc)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (bc / "bad.parquet").exists()


def test_test_set_of_the_wrong_width(bc):
    write_dataset(sklearn_dataset("diabetes"), bc / "narrow.parquet", overwrite=True)
    p = run("influence", "--cache", "c", "--test", "narrow.parquet", "--out", "x.parquet", cwd=bc)
    assert p.returncode == 2 and "test set: rows have 10 features, expected 30" in p.stderr


def test_loo_on_a_derived_cache_refuses_ids_it_already_removed(bc):
    """`unlearn --out-cache` removes ids from the trajectory; leaving one of them out again would
    subtract its row twice. Every command refuses it with the message `unlearn` gives (exit 2)."""
    (bc / "gone.txt").write_text("\n".join((bc / "ids.txt").read_text().split()[:2]))
    ok("unlearn", "--cache", "c", "--delete", "gone.txt", "--out", "u.safetensors", "--out-cache", "c-derived",
       cwd=bc)
    gone = (bc / "gone.txt").read_text().split()
    for cmd in (["loo"], ["conformal", "--test", "test.parquet"], ["jackknife", "--test", "test.parquet"]):
        p = run(*cmd, "--cache", "c-derived", "--ids", "ids.txt", "--out", "again.parquet", cwd=bc)
        assert p.returncode == 2, p.stderr
        assert f"ids already deleted from this trajectory: {gone[0]}, {gone[1]}" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and not (bc / "again.parquet").exists()
    p = run("unlearn", "--cache", "c-derived", "--delete", "gone.txt", "--out", "twice.safetensors", cwd=bc)
    assert p.returncode == 2 and f"ids already deleted from this trajectory: {gone[0]}, {gone[1]}" in p.stderr
    # by default the derived cache's LOO leaves out only the rows it still has
    out = ok("loo", "--cache", "c-derived", "--out", "rest.parquet", cwd=bc)
    table, _ = read_table(bc / "rest.parquet")
    assert out["requests"] == 198 and not set(map(int, gone)) & set(table.column("id").to_pylist())
