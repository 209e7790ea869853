"""The deltagrad-ray command, run as a user runs it: separate processes, files in between."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deltagrad_ray import api
from deltagrad_ray.store import load_model, write_dataset
from deltagrad_ray.core import Dataset, synthetic_classification

from ..processes import assert_same_across_processes


def run(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "deltagrad_ray.cli", "--json", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def ok(*args: str, cwd) -> dict:
    p = run(*args, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ok("make-data", "--kind", "classification", "--n", "2000", "--d", "12", "--classes", "3", "--out",
       "data.parquet", cwd=d)
    ok("train", "--data", "data.parquet", "--model", "mlp", "--hidden", "8", "--optimizer", "sgd",
       "--batch-size", "1000", "--steps", "60", "--lr", "0.1", "--l2", "0.01", "--seed", "4", "--cache", "c1", cwd=d)
    (d / "ids.txt").write_text("3\n17\n256\n")
    return d


def test_cli_round_trip_gives_the_python_api_parameters(workdir):
    out = ok("unlearn", "--cache", "c1", "--delete", "ids.txt", "--out", "u.safetensors", cwd=workdir)
    assert {"seconds", "steps", "explicit_steps", "fallbacks"} <= set(out)
    _, theta_cli, meta = load_model(workdir / "u.safetensors")
    res = api.unlearn(str(workdir / "c1"), delete=[3, 17, 256])
    assert_same_across_processes(theta_cli, res.params)  # the command ran in another process
    assert meta["method"] == "deltagrad" and meta["explicit_steps"] == res.explicit_steps

    ok("retrain", "--cache", "c1", "--delete", "ids.txt", "--out", "r.safetensors", cwd=workdir)
    _, theta_exact, _ = load_model(workdir / "r.safetensors")
    assert_same_across_processes(theta_exact, api.retrain_exact(str(workdir / "c1"), delete=[3, 17, 256]))
    ev = ok("evaluate", "--model", "u.safetensors", "--data", "data.parquet", cwd=workdir)
    assert 0.5 < ev["accuracy"] <= 1 and ev["loss"] > 0


def test_cli_deltagrad_flags_reach_the_replay(workdir):
    from deltagrad_ray.core import DeltaGradConfig
    ok("unlearn", "--cache", "c1", "--delete", "ids.txt", "--out", "flags.safetensors", "--period", "3",
       "--sigma", "yy/sy", "--curvature-guard", "5", "--schedule", "adaptive", "--adaptive-tol", "0.3", cwd=workdir)
    _, theta, meta = load_model(workdir / "flags.safetensors")
    cfg = DeltaGradConfig(period=3, sigma="yy/sy", curvature_guard=5.0, schedule="adaptive", adaptive_tol=0.3)
    assert meta["config"] == cfg.to_dict()
    assert_same_across_processes(theta, api.unlearn(str(workdir / "c1"), delete=[3, 17, 256], config=cfg).params)
    assert not torch.allclose(theta, api.unlearn(str(workdir / "c1"), delete=[3, 17, 256]).params,
                              rtol=0, atol=1e-8)  # the flags changed the replay


def test_cli_addition(workdir):
    extra = synthetic_classification(5, 12, 3, seed=9)
    write_dataset(Dataset(extra.X, extra.y, extra.ids + 10_000), workdir / "new.parquet")
    out = ok("unlearn", "--cache", "c1", "--add", "new.parquet", "--out", "a.safetensors", cwd=workdir)
    assert out["steps"] == 60


@pytest.mark.parametrize("setup,args,code,message", [
    (None, ["unlearn", "--cache", "c1", "--delete", "unknown.txt", "--out", "x.safetensors"], 2,
     "unknown ids to delete (not in the data): 99999"),
    (None, ["unlearn", "--cache", "c1", "--delete", "dups.txt", "--out", "x.safetensors"], 2,
     "duplicate ids to delete: 3"),
    (None, ["unlearn", "--cache", "c1", "--add", "wide.parquet", "--out", "x.safetensors"], 2,
     "added rows: rows have 13 features, expected 12"),
    (None, ["unlearn", "--cache", "c1", "--add", "badlabel.parquet", "--out", "x.safetensors"], 2,
     "labels out of range [0, 3)"),
    (None, ["unlearn", "--cache", "c1", "--add", "nan.parquet", "--out", "x.safetensors"], 2,
     "NaN or inf features in rows with id 20000"),
    (None, ["unlearn", "--cache", "c1", "--delete", "ids.txt", "--period", "0", "--out", "x.safetensors"], 2,
     "argument --period: must be an integer >= 1, got '0'"),
    (None, ["unlearn", "--cache", "c1", "--delete", "ids.txt", "--history", "0", "--out", "x.safetensors"], 2,
     "argument --history: must be an integer >= 1, got '0'"),
    (None, ["unlearn", "--cache", "c1", "--delete", "all.txt", "--out", "x.safetensors"], 2,
     "deletes every one of the 2000 remaining rows"),
    (None, ["unlearn", "--cache", "c1", "--delete", "ids.txt", "--data", "other.parquet", "--out", "x.safetensors"],
     2, "is not the data set the cache c1 was trained on"),
    (None, ["unlearn", "--cache", "nowhere", "--delete", "ids.txt", "--out", "x.safetensors"], 3,
     "nowhere: no trajectory cache here"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(workdir, setup, args, code, message):
    (workdir / "unknown.txt").write_text("3\n99999\n")
    (workdir / "dups.txt").write_text("3\n3\n")
    (workdir / "all.txt").write_text("\n".join(str(i) for i in range(2000)))
    wide = synthetic_classification(2, 13, 3, seed=0)
    write_dataset(Dataset(wide.X, wide.y, wide.ids + 20_000), workdir / "wide.parquet", overwrite=True)
    base = synthetic_classification(2, 12, 3, seed=0)
    write_dataset(Dataset(base.X, torch.tensor([0, 5]), base.ids + 20_000), workdir / "badlabel.parquet",
                  overwrite=True)
    X = base.X.clone()
    X[0, 0] = float("nan")
    write_dataset(Dataset(X, base.y, base.ids + 20_000), workdir / "nan.parquet", overwrite=True)
    write_dataset(synthetic_classification(2000, 12, 3, seed=99), workdir / "other.parquet", overwrite=True)
    p = run(*args, cwd=workdir)
    assert p.returncode == code, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert not (workdir / "x.safetensors").exists()


def test_cli_refuses_to_overwrite_outputs(workdir):
    (workdir / "keep.safetensors").write_bytes(b"precious")
    p = run("unlearn", "--cache", "c1", "--delete", "ids.txt", "--out", "keep.safetensors", cwd=workdir)
    assert p.returncode == 3 and "already exists" in p.stderr
    assert (workdir / "keep.safetensors").read_bytes() == b"precious"


def test_cli_help_lists_commands_with_examples():
    p = subprocess.run([sys.executable, "-m", "deltagrad_ray.cli", "--help"], capture_output=True, text=True)
    for cmd in ("train", "unlearn", "retrain", "evaluate", "make-data", "demo"):
        assert cmd in p.stdout
    assert "examples:" in p.stdout


def test_default_output_is_one_readable_line(workdir):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "deltagrad_ray.cli", "evaluate", "--model", "u.safetensors",
                        "--data", "data.parquet"], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip()
    assert line.startswith("evaluate: ") and "accuracy" in line and "{" not in line.split(": ", 1)[0]


@pytest.mark.slow
def test_the_demo_runs_end_to_end_and_states_its_certificate(tmp_path):
    """`deltagrad-ray demo` (the README's main job) at a small size: every stage runs on a local Ray,
    the erasure is verified against exact retraining, and the index shows the certificate beside it."""
    out = ok("demo", "--out", str(tmp_path / "demo"), "--n", "3000", "--d", "20", "--steps", "40", cwd=tmp_path)
    assert out["stage"] == "done" and out["erasure_ratio_vs_exact"] < 0.05 and out["coverage"] > 0.7
    index = (tmp_path / "demo" / "reports" / "index.md").read_text()
    assert "certificate: error estimate" in index and "faster than retraining" in index
    if out["erasure_error_estimate"] is not None:     # the estimate is conservative where it is finite
        assert out["erasure_error_estimate"] >= out["erasure_ratio_vs_exact"]
