"""Every failure loud (issue 15): divergence, storage range, outputs over inputs, the same checks of
ids, labels, devices and locations on every command, and the warnings a user needs — each run as a
user runs it (separate processes, files in between)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deltagrad_ray import api
from deltagrad_ray.core import Dataset, InputError, synthetic_classification, synthetic_regression
from deltagrad_ray.store import open_cache, save_model, write_dataset

from .test_cli import ok, run
from ..processes import python


def tree_digest(path: pathlib.Path) -> str:
    """sha256 over the names and bytes of every file below ``path``."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def one_error(p: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("loud")
    write_dataset(synthetic_classification(600, 6, 3, seed=0), d / "data.parquet")
    api.fit(str(d / "data.parquet"), str(d / "c1"), model="logreg", steps=60, lr=0.3, l2=0.01)
    test = synthetic_classification(40, 6, 3, seed=5)
    write_dataset(Dataset(test.X, test.y, test.ids + 10_000), d / "test.parquet")
    reg = synthetic_regression(400, 5, seed=1)
    write_dataset(reg, d / "reg.parquet")
    write_dataset(Dataset(reg.X, reg.y * 1e5, reg.ids), d / "big-targets.parquet")
    (d / "ids.txt").write_text("3\n17\n")
    return d


# -- divergence ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr", ["1e6", "5"])
def test_training_that_diverges_is_refused_and_leaves_nothing(w, lr):
    """lr 1e6 reached NaN, lr 5 weights of 1e48 (finite): both exited 0 with a NaN or exploded cache."""
    p = run("train", "--data", "reg.parquet", "--model", "linear", "--steps", "60", "--lr", lr, "--shard-steps", "5",
            "--cache", f"div-{lr}", cwd=w)
    assert p.returncode == 2, p.stderr
    assert "error: training diverged" in p.stderr and "step" in p.stderr
    assert "smaller learning rate (lr / --lr" in p.stderr
    assert not (w / f"div-{lr}").exists()


def test_api_fit_stops_at_the_first_non_finite_step(w, tmp_path):
    with pytest.raises(InputError, match=r"training diverged (at|by) step \d+: .*use a smaller learning rate"):
        api.fit(str(w / "reg.parquet"), str(tmp_path / "c"), model="linear", steps=200, lr=1e6, shard_steps=3)
    assert not (tmp_path / "c").exists()


def test_a_sane_run_is_not_taken_for_a_divergence(w, tmp_path):
    """Loss growth at the edge of stability stays far below the 1e4 factor: lr just under 2/L trains."""
    cache = api.fit(str(w / "reg.parquet"), str(tmp_path / "c"), model="linear", steps=200, lr=0.9)
    assert torch.isfinite(cache.final).all()


def test_evaluate_refuses_a_nan_model(w):
    c = open_cache(w / "c1")
    save_model(w / "nan.safetensors", c.model, torch.full_like(c.final, float("nan")), overwrite=True)
    one_error(run("evaluate", "--model", "nan.safetensors", "--data", "data.parquet", cwd=w), 2,
              f"the model nan.safetensors has {c.final.numel()} non-finite value(s)")


# -- storage precision ------------------------------------------------------------------------------------
def test_values_beyond_float16_are_refused_at_train_time(w):
    """They were stored as inf (341 of 540 values in one run): later replays failed without naming it."""
    p = run("train", "--data", "big-targets.parquet", "--model", "linear", "--steps", "20", "--lr", "0.1",
            "--storage-dtype", "float16", "--cache", "f16", cwd=w)
    one_error(p, 2, "beyond the range of the storage dtype float16 (largest 65504")
    assert "step 0: the gradient holds" in p.stderr and "store the cache as float32 or bfloat16" in p.stderr
    assert not (w / "f16").exists()
    ok("train", "--data", "big-targets.parquet", "--model", "linear", "--steps", "20", "--lr", "0.1",
       "--storage-dtype", "bfloat16", "--cache", "bf16", cwd=w)


def test_a_cache_holding_non_finite_values_is_refused_by_replays(w, monkeypatch):
    """A cache written before the writer checked its inputs (float16 overflowed to inf)."""
    from deltagrad_ray.store.cache_writer import CacheWriter
    with monkeypatch.context() as m:
        m.setattr(CacheWriter, "_check", lambda self, step, theta, grad: None)
        api.fit(str(w / "big-targets.parquet"), str(w / "legacy"), model="linear", steps=20, lr=0.1,
                storage_dtype="float16")
    one_error(run("unlearn", "--cache", "legacy", "--delete", "ids.txt", "--out", "l.safetensors", cwd=w), 2,
              "holds non-finite params (NaN or inf")
    one_error(run("loo", "--cache", "legacy", "--ids", "ids.txt", "--out", "l.parquet", cwd=w), 2,
              "holds non-finite params (NaN or inf")


# -- outputs never over inputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["unlearn", "--cache", "c1", "--delete", "ids.txt", "--out", "c1/model.safetensors", "--overwrite"],
     "--out c1/model.safetensors lies inside --cache c1, which this command reads"),
    (["retrain", "--cache", "c1", "--delete", "ids.txt", "--out", "c1/initial.safetensors", "--overwrite"],
     "--out c1/initial.safetensors lies inside --cache c1"),
    (["loo", "--cache", "c1", "--ids", "ids.txt", "--out", "c1/shards/x.parquet", "--overwrite"],
     "--out c1/shards/x.parquet lies inside --cache c1"),
    (["loo", "--cache", "c1", "--ids", "ids.txt", "--out", "data.parquet", "--overwrite"],
     "--out data.parquet is the same location as the cache's data"),
    (["unlearn", "--cache", "c1", "--delete", "ids.txt", "--out", "ids.txt", "--overwrite"],
     "--out ids.txt is the same location as --delete ids.txt"),
    (["conformal", "--cache", "c1", "--test", "test.parquet", "--out", "test.parquet", "--overwrite"],
     "--out test.parquet is the same location as --test test.parquet"),
    (["unlearn", "--cache", "c1", "--delete", "ids.txt", "--out", "u.safetensors", "--out-cache", "c1/next"],
     "--out-cache c1/next lies inside --cache c1"),
    (["train", "--data", "data.parquet", "--model", "logreg", "--steps", "5", "--lr", "0.1", "--cache",
      "data.parquet"], "--cache data.parquet is the same location as --data data.parquet"),
])
def test_outputs_never_land_on_what_a_command_reads(w, args, message):
    before = tree_digest(w / "c1"), (w / "data.parquet").read_bytes(), (w / "ids.txt").read_bytes()
    one_error(run(*args, cwd=w), 2, message)
    assert (tree_digest(w / "c1"), (w / "data.parquet").read_bytes(), (w / "ids.txt").read_bytes()) == before
    assert api.unlearn(str(w / "c1"), delete=[3]).params.shape == open_cache(w / "c1").final.shape


# -- the same checks everywhere -----------------------------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    ("", "no ids in this file (an empty id list)"),
    ("# only a comment\n\n", "no ids in this file (an empty id list)"),
    ("3\n99999999999999999999\n", "line 2: id 99999999999999999999 is beyond int64"),
    ("1_4\n", "line 1: '1_4' is not an integer id"),
])
@pytest.mark.parametrize("command", ["unlearn", "retrain", "loo"])
def test_id_files_are_checked_alike_by_every_command(w, content, message, command):
    """An empty file made unlearn/retrain exit 0 with the unchanged model; a huge id was a bug (exit 1);
    1_4 was read as 14 (and deleted it)."""
    (w / "bad-ids.txt").write_text(content)
    flag = "--ids" if command == "loo" else "--delete"
    one_error(run(command, "--cache", "c1", flag, "bad-ids.txt", "--out", "bad.out", cwd=w), 2,
              f"bad-ids.txt{',' if 'line' in message else ':'} {message}")
    assert not (w / "bad.out").exists()


def test_parquet_ids_beyond_int64_are_refused(w):
    pq.write_table(pa.table({"id": pa.array([3, 2**63 + 5], pa.uint64())}), w / "huge-ids.parquet")
    one_error(run("unlearn", "--cache", "c1", "--delete", "huge-ids.parquet", "--out", "bad.out", cwd=w), 2,
              f"id {2**63 + 5} is beyond int64")


@pytest.mark.parametrize("label", [5, -1])
@pytest.mark.parametrize("command", ["conformal", "jackknife"])
def test_test_labels_outside_the_classes_are_refused_by_every_command(w, label, command):
    """conformal failed with an IndexError (exit 1) on a label of 5, and took -1 as the last class."""
    t = synthetic_classification(10, 6, 3, seed=6)
    y = t.y.clone()
    y[4] = label
    write_dataset(Dataset(t.X, y, t.ids + 20_000), w / "bad-test.parquet", overwrite=True)
    one_error(run(command, "--cache", "c1", "--test", "bad-test.parquet", "--ids", "ids.txt", "--out", "bad.out",
                  cwd=w), 2, f"test set: labels out of range [0, 3) in rows with id 20004 (labels {label})")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("args", [
    ["train", "--data", "data.parquet", "--model", "logreg", "--steps", "5", "--lr", "0.1", "--cache", "cuda-c"],
    ["unlearn", "--cache", "c1", "--delete", "ids.txt", "--out", "cuda.safetensors"],
    ["retrain", "--cache", "c1", "--delete", "ids.txt", "--out", "cuda.safetensors"],
])
def test_a_device_this_machine_lacks_is_bad_input(w, args):
    one_error(run(*args, "--device", "cuda:0", cwd=w), 2, "device cuda:0: CUDA is not available on this machine")
    one_error(run(*args, "--device", "tpu", cwd=w), 2, "device must be cpu, cuda or cuda:N, got 'tpu'")


@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write to (as root, which ignores permissions: /sys)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").write_bytes(b"")
    except OSError:
        yield d
    else:
        (d / "probe").unlink()
        yield pathlib.Path("/sys/deltagrad-ray-read-only")
    d.chmod(0o755)


@pytest.mark.parametrize("args,flag", [
    (["make-data", "--kind", "iris"], "--out"),
    (["train", "--data", "data.parquet", "--model", "logreg", "--steps", "5", "--lr", "0.1"], "--cache"),
    (["unlearn", "--cache", "c1", "--delete", "ids.txt"], "--out"),
    (["loo", "--cache", "c1", "--ids", "ids.txt"], "--out"),
])
def test_read_only_outputs_are_storage_problems(w, read_only, args, flag):
    one_error(run(*args, flag, str(read_only / "x"), cwd=w), 3, "cannot write")


def test_an_output_under_a_file_is_named_as_such(w):
    one_error(run("unlearn", "--cache", "c1", "--delete", "ids.txt", "--out", "test.parquet/u.safetensors", cwd=w), 3,
              "test.parquet/u.safetensors: cannot write (a part of its folder path is a file, not a folder)")


@pytest.mark.parametrize("args,message", [
    (["evaluate", "--model", "missing.safetensors", "--data", "data.parquet"], "missing.safetensors: not found"),
    (["evaluate", "--model", "c1/model.safetensors", "--data", "missing.parquet"], "missing.parquet: no data set"),
    (["unlearn", "--cache", "missing", "--delete", "ids.txt", "--out", "m.out"], "missing: no trajectory cache"),
    (["unlearn", "--cache", "c1", "--delete", "missing.txt", "--out", "m.out"], "missing.txt: not found"),
    (["unlearn", "--cache", "c1", "--add", "missing.parquet", "--out", "m.out"], "missing.parquet: no data set"),
    (["conformal", "--cache", "c1", "--test", "missing.parquet", "--out", "m.out"], "missing.parquet: no data set"),
])
def test_missing_locations_are_storage_problems(w, args, message):
    one_error(run(*args, cwd=w), 3, message)


def test_an_empty_data_set_is_bad_input(w):
    """It was a bug (exit 1) for train; an empty set of rows to add changed nothing, with exit 0."""
    empty = synthetic_classification(5, 6, 3, seed=0).rows(torch.arange(0))
    write_dataset(empty, w / "empty.parquet", overwrite=True)
    one_error(run("train", "--data", "empty.parquet", "--model", "logreg", "--steps", "5", "--lr", "0.1", "--cache",
                  "e", cwd=w), 2, "empty.parquet: no rows (an empty data set)")
    one_error(run("unlearn", "--cache", "c1", "--add", "empty.parquet", "--out", "e.out", cwd=w), 2,
              "empty.parquet: no rows (an empty data set)")
    one_error(run("conformal", "--cache", "c1", "--test", "empty.parquet", "--out", "e.out", cwd=w), 2,
              "empty.parquet: no rows (an empty data set)")
    assert not (w / "e").exists()


def test_percent_encoded_file_uris_are_decoded(w):
    (w / "my data").mkdir(exist_ok=True)
    write_dataset(synthetic_classification(100, 6, 3, seed=0), w / "my data" / "data.parquet", overwrite=True)
    base = (w / "my data").as_uri()  # file:///…/my%20data
    assert "%20" in base
    ok("train", "--data", f"{base}/data.parquet", "--model", "logreg", "--steps", "5", "--lr", "0.1", "--cache",
       f"{base}/c", cwd=w)
    assert (w / "my data" / "c" / "manifest.json").exists()
    one_error(run("evaluate", "--model", "file://c1/model.safetensors", "--data", "data.parquet", cwd=w), 2,
              "a file URI names an absolute local path")


# -- warnings ------------------------------------------------------------------------------------------
def test_a_stray_label_that_adds_classes_is_a_warning(w):
    d = synthetic_classification(300, 6, 3, seed=2)
    y = d.y.clone()
    y[11] = 7
    write_dataset(Dataset(d.X, y, d.ids), w / "stray.parquet", overwrite=True)
    p = run("train", "--data", "stray.parquet", "--model", "logreg", "--steps", "5", "--lr", "0.1", "--cache",
            "stray-c", cwd=w)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the labels give 8 classes (0 … 7"), p.stderr
    assert "5 of them have at most one row (class: rows 3: 0, 4: 0, 5: 0, 6: 0, 7: 1)" in lines[0]
    p = run("train", "--data", "stray.parquet", "--model", "logreg", "--steps", "5", "--lr", "0.1", "--classes", "8",
            "--cache", "stray-c8", cwd=w)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_api_fit_warns_of_a_stray_label(w, tmp_path):
    d = synthetic_classification(300, 6, 3, seed=2)
    y = d.y.clone()
    y[11] = 7
    with pytest.warns(api.DataWarning, match="the labels give 8 classes"):
        api.fit((d.X.numpy(), y.numpy()), str(tmp_path / "c"), steps=5, lr=0.1)


@pytest.mark.parametrize("command", [
    ["unlearn", "--delete", "ids.txt", "--out", "acc.out", "--overwrite"],
    ["loo", "--ids", "ids.txt", "--out", "acc.out", "--overwrite"],
    ["jackknife", "--test", "test.parquet", "--ids", "ids.txt", "--out", "acc.out", "--overwrite"],
    ["influence", "--test", "test.parquet", "--ids", "ids.txt", "--out", "acc.out", "--overwrite"],
    ["conformal", "--test", "test.parquet", "--ids", "ids.txt", "--out", "acc.out", "--overwrite"],
])
def test_every_replaying_command_warns_of_a_schedule_that_measures_nothing(w, command):
    """--period 1000 on 60 steps: no explicit step after the burn-in, an error ratio of 0.17 here
    (0.25 in the issue), and no warning on any command."""
    p = run(command[0], "--cache", "c1", *command[1:], "--period", "1000", cwd=w)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the schedule (uniform, period 1000) leaves 49 "
                                                   "consecutive steps of 60 approximated"), p.stderr
    p = run(command[0], "--cache", "c1", *command[1:], cwd=w)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_a_fanout_where_every_request_failed_is_an_error(w, capsys):
    import argparse

    from deltagrad_ray import cli
    from deltagrad_ray.distributed.collect import RunReport
    from deltagrad_ray.many import Fanout
    n, p = 3, open_cache(w / "c1").model.p
    counters = {k: torch.zeros(n, dtype=torch.int64) for k in ("explicit_steps", "approx_steps", "fallbacks")}
    args, ids = argparse.Namespace(cache=str(w / "c1")), torch.tensor([5, 6, 7])
    failed = RunReport(torch.full((n, p), float("nan")), counters, {0: "why 0", 1: "why 1", 2: "why 2"},
                       {"prediction_error_mean": torch.zeros(n)})
    with pytest.raises(InputError, match="all 3 replays failed, e.g. id 5: why 0; id 6: why 1"):
        cli._warn_replays(args, Fanout(), failed, ids)
    some = failed._replace(errors={1: "why 1"})
    cli._warn_replays(args, Fanout(), some, ids)
    assert capsys.readouterr().err.startswith("warning: 1 of 3 replays failed (NaN params and the reason in the "
                                              "'error' column of --out), e.g. id 6: why 1")


# -- no orphan shards --------------------------------------------------------------------------------------
def _interrupt_when(proc: subprocess.Popen, ready, sig: int, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.01)
    proc.send_signal(sig)


def _popen(*args: str, cwd) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # SIGINT at its default in the child, however the suite was started (tests/processes.py)
    return subprocess.Popen(python("-m", "deltagrad_ray.cli", *args), cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    write_dataset(synthetic_classification(20_000, 100, 3, seed=0), d / "data.parquet")
    (d / "ids.txt").write_text("3\n17\n")
    return d


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_train_leaves_no_orphan_shards(wide, sig):
    """Ctrl-C (or SIGTERM) during training: exit 130, and the shards written so far are removed
    (they were left behind: an interrupted or failed run kept a full disk 78% full)."""
    proc = _popen("train", "--data", "data.parquet", "--model", "logreg", "--steps", "20000", "--lr", "0.5",
                  "--shard-steps", "10", "--cache", f"c-{sig}", cwd=wide)
    shards = wide / f"c-{sig}" / "shards"
    _interrupt_when(proc, lambda: shards.is_dir() and any(shards.glob("*.parquet")), sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "warning: removed the" in err
    assert not (wide / f"c-{sig}").exists()


def test_an_interrupted_out_cache_leaves_no_orphan_shards(wide):
    api.fit(str(wide / "data.parquet"), str(wide / "base"), steps=400, lr=0.5, shard_steps=10)
    proc = _popen("unlearn", "--cache", "base", "--delete", "ids.txt", "--period", "1", "--out", "u.safetensors",
                  "--out-cache", "next", cwd=wide)
    shards = wide / "next" / "shards"
    _interrupt_when(proc, lambda: shards.is_dir() and any(shards.glob("*.parquet")), signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not (wide / "next").exists() and not (wide / "u.safetensors").exists()
    assert open_cache(wide / "base").steps == 400
