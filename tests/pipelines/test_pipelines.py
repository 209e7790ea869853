"""The pipelines end to end: as `python -m pipelines.<name>`, in-process on Ray, and as Ray jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deltagrad_ray.datasets import sklearn_dataset, train_test_split
from deltagrad_ray.results import read_table
from deltagrad_ray.store import write_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipelines")
    train_rows, test_rows = train_test_split(sklearn_dataset("diabetes"), 200, n_test=60)
    write_dataset(train_rows, d / "train.parquet")
    write_dataset(test_rows, d / "test.parquet")
    return d


def _config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _pipeline(name: str, config: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DELTAGRAD_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", f"pipelines.{name}", "--config", config], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _train(d: Path) -> Path:
    cache = d / "cache"
    if not (cache / "manifest.json").exists():
        cfg = _config(d / "train.yaml", {"data": str(d / "train.parquet"), "cache": str(cache),
                                         "model": {"kind": "linear"},
                                         "optimizer": {"steps": 150, "lr": 0.1, "l2": 0.001},
                                         "report": str(d / "reports")})
        p = _pipeline("train", cfg, d)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert Path(out["report"]).read_text().startswith("# Training")
        assert (Path(out["report"]).parent / "loss.png").stat().st_size > 1000
    return cache


def test_train_pipeline_as_a_module(diabetes):
    assert (_train(diabetes) / "manifest.json").exists()


@pytest.mark.parametrize("cfg,message", [
    ({"data": "x.parquet", "cache": "c", "colour": "blue"}, "config: unknown key colour; expected one of"),
    ({"data": "x.parquet"}, "config: missing required key cache"),
    ({"data": "x.parquet", "cache": "c", "optimizer": {"steps": "many"}},
     "config: optimizer.steps must be a int, got 'many'"),
])
def test_bad_configs_are_one_line_errors(tmp_path, cfg, message):
    p = _pipeline("train", _config(tmp_path / "bad.yaml", cfg), tmp_path)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_unparseable_config(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    p = _pipeline("train", str(tmp_path / "bad.yaml"), tmp_path)
    assert p.returncode == 2 and "is not valid YAML" in p.stderr


@pytest.mark.slow
def test_jackknife_pipeline_on_ray(ray_cluster, diabetes):
    from pipelines import jackknife
    from pipelines._config import load
    cache = _train(diabetes)
    cfg = load(_config(diabetes / "jk.yaml", {
        "cache": str(cache), "test": str(diabetes / "test.parquet"), "output": str(diabetes / "jk"),
        # data-parallel: the features on two data actors, the replay actors hold ids and labels
        "ray": {"address": ray_cluster.address, "workers": 2, "batch_size": 32, "data_shards": 2},
        "report": str(diabetes / "reports"), "verify": 59, "exact_above": 0.05}),
        jackknife.SCHEMA)
    out = jackknife.run(cfg)
    assert out["backend"] == "ray" and out["loo_models"] == 200
    table, _ = read_table(diabetes / "jk" / "influence.parquet")
    assert table.num_rows == 200
    # every model's evidence: the ones the estimate did not certify within 0.05 were retrained exactly,
    # and 59 drawn at random and retrained exactly show it held (the estimate is conservative)
    method = table.column("method").to_pylist()
    assert out["retrained_exactly"] == method.count("exact")
    assert all(e <= 0.05 for e in table.column("error_estimate").to_pylist())
    v = out["verification"]
    assert v["sampled"] == 59 and v["population"] == 200 and v["max_error"] <= 0.05 and v["bound"] is not None
    assert (Path(out["report"]).parent / "influence.png").exists()
    assert (Path(out["report"]).parent / "estimate-vs-truth.png").exists()  # the sampled models, estimate vs truth


@pytest.mark.slow
@pytest.mark.integration
def test_conformal_pipeline_as_a_ray_job(ray_cluster, diabetes):
    """Submitted with JobSubmissionClient (runtime_env working_dir = the repo), it succeeds and
    writes its outputs; a job with a broken config ends FAILED with the reason in its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    cache = _train(diabetes)
    dashboard = ray_cluster.head_node.address_info["webui_url"]
    client = JobSubmissionClient(f"http://{dashboard}")
    cfg = _config(diabetes / "conformal.yaml", {
        "cache": str(cache), "test": str(diabetes / "test.parquet"), "output": str(diabetes / "conformal"),
        "alpha": 0.1, "ray": {"address": "auto", "workers": 2, "batch_size": 32}, "report": str(diabetes / "reports"),
        "verify": 59})
    broken = _config(diabetes / "broken.yaml", {"cache": str(cache), "tset": "typo"})
    env = {"working_dir": str(ROOT), "excludes": [".venv", ".git", "demo-output", "*.parquet", "docs"],
           "env_vars": {"DELTAGRAD_NO_PROGRESS": "1", "OMP_WAIT_POLICY": "PASSIVE"}}
    def submit(entrypoint: str) -> str:
        deadline = time.time() + 120
        while True:  # the head's job agent can take a while to come up on a loaded machine
            try:
                return client.submit_job(entrypoint=entrypoint, runtime_env=env)
            except RuntimeError as e:
                if "No available agent" not in str(e) or time.time() > deadline:
                    raise
                time.sleep(2)

    ok = submit(f"{sys.executable} -m pipelines.conformal --config {cfg}")
    bad = submit(f"{sys.executable} -m pipelines.conformal --config {broken}")
    final = {}
    deadline = time.time() + 600
    while len(final) < 2 and time.time() < deadline:
        for job in (ok, bad):
            status = client.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                final[job] = status
        time.sleep(1)
    assert final.get(ok) == JobStatus.SUCCEEDED, client.get_job_logs(ok)[-3000:]
    summary = json.loads(client.get_job_logs(ok).strip().splitlines()[-1])
    assert summary["coverage"] >= 0.75 and summary["models"] == 200
    v = summary["verification"]  # 59 of the 200 models retrained exactly: a bound on 95% of them
    assert v["sampled"] == 59 and v["population"] == 200 and v["bound"] is not None and 0 < v["max_error"] < 0.05
    assert (Path(summary["report"]).parent / "estimate-vs-truth.png").exists()
    table, meta = read_table(diabetes / "conformal" / "conformal.parquet")
    assert table.num_rows == 60 and {"lower", "upper"} <= set(table.column_names)
    assert final.get(bad) == JobStatus.FAILED
    assert "config: unknown key tset" in client.get_job_logs(bad)


@pytest.mark.slow
def test_bulk_erasure_pipeline_runs_its_replay_on_a_ray_worker(ray_cluster, tmp_path):
    from deltagrad_ray import api
    from deltagrad_ray.core import synthetic_classification
    from deltagrad_ray.erasure import Registry
    from pipelines import bulk_erasure
    from pipelines._config import load
    write_dataset(synthetic_classification(1500, 10, 3, seed=0), tmp_path / "data.parquet")
    cache = api.fit(str(tmp_path / "data.parquet"), str(tmp_path / "models" / "current"), steps=50, lr=0.5, l2=0.01)
    (tmp_path / "requests").mkdir()
    (tmp_path / "requests" / "r.jsonl").write_text(
        "\n".join(json.dumps({"request_id": f"r{i}", "data_id": i}) for i in range(15)) + "\n")
    cfg = load(_config(tmp_path / "be.yaml", {
        "cache": str(tmp_path / "models" / "current"), "requests": str(tmp_path / "requests"),
        "output": str(tmp_path / "models"), "ray": {"address": ray_cluster.address, "num_cpus": 1},
        "report": str(tmp_path / "reports")}), bulk_erasure.SCHEMA)
    out = bulk_erasure.run(cfg)
    assert out["applied"] == 15 and out["published"]["version"] == 1
    reg = Registry(tmp_path / "models")
    exact = api.retrain_exact(cache, delete=list(range(15)))
    assert float((reg.open(reg.latest()).final - exact).norm()) <= 0.05 * float((exact - cache.final).norm())
    assert Path(out["report"]).exists()


# -- issue 22: hostile and careless settings in a job's config ------------------------------------------------------
@pytest.mark.parametrize("ray, message", [
    ({"workers": 2.5}, "workers must be an integer >= 1, got 2.5"),
    ({"num_cpus": 0}, "num_cpus must be a finite number > 0, got 0"),
    ({"num_gpus": float("nan")}, "num_gpus must be a finite number >= 0, got nan"),  # was exit 1 (int(nan))
    ({"batch_size": 0}, "batch size must be an integer >= 1, got 0"),
    ({"address": "http://127.0.0.1:8265"}, "is an HTTP address (the dashboard or job API), not a cluster's"),
])
def test_bad_ray_settings_are_one_line_errors(diabetes, tmp_path, ray, message):
    cache = _train(diabetes)
    cfg = _config(tmp_path / "jk.yaml", {"cache": str(cache), "test": str(diabetes / "test.parquet"),
                                         "output": str(tmp_path / "jk"), "ray": ray})
    p = _pipeline("jackknife", cfg, tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "jk" / "loo.parts").exists()  # refused before any work


def test_a_job_whose_ray_address_does_not_answer_fails_within_the_connect_timeout(diabetes, tmp_path):
    """Nothing listens at the address: the job ends with exit 3 after CONNECT_TIMEOUT_S (30 s), one
    line naming the address, instead of Ray's own retries (minutes)."""
    import socket

    from deltagrad_ray.distributed.session import CONNECT_TIMEOUT_S
    cache = _train(diabetes)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = _config(tmp_path / "jk.yaml", {"cache": str(cache), "test": str(diabetes / "test.parquet"),
                                         "output": str(tmp_path / "jk"), "ray": {"address": f"127.0.0.1:{port}"}})
    t0 = time.monotonic()
    p = _pipeline("jackknife", cfg, tmp_path)
    seconds = time.monotonic() - t0
    assert p.returncode == 3, p.stderr[-2000:]
    assert p.stderr.strip() == (f"error: Ray cluster at 127.0.0.1:{port}: cannot connect (Connection refused) within "
                                f"{CONNECT_TIMEOUT_S:g} s; check --address (or RAY_ADDRESS) and that the cluster is up")
    assert CONNECT_TIMEOUT_S <= seconds < CONNECT_TIMEOUT_S + 60, seconds  # bounded: start-up, then the timeout


@pytest.mark.slow
def test_a_storage_error_on_a_ray_actor_ends_the_job_as_in_process(ray_cluster, diabetes, tmp_path):
    """A shard of the cache removed after training: the actors fail to load it; the job prints the
    StorageError's one line and ends with 3, as a serial run of the same cache does (was: the remote
    traceback, exit 1)."""
    import shutil

    from deltagrad_ray import api
    from deltagrad_ray.store.location import StorageError
    shutil.copytree(_train(diabetes), tmp_path / "cache")
    last = sorted((tmp_path / "cache" / "shards").iterdir())[-1]
    last.unlink()
    with pytest.raises(StorageError) as in_process:  # in process, as a serial run reads it
        api.open_cache(str(tmp_path / "cache")).trajectory()
    assert str(last) in str(in_process.value)
    cfg = _config(tmp_path / "jk.yaml", {"cache": str(tmp_path / "cache"), "test": str(diabetes / "test.parquet"),
                                         "output": str(tmp_path / "jk"),
                                         "ray": {"address": ray_cluster.address, "workers": 1, "mode": "replicated"}})
    p = _pipeline("jackknife", cfg, tmp_path)
    assert p.returncode == 3, p.stderr[-3000:]
    lines = [x for x in p.stderr.strip().splitlines() if " INFO " not in x and "\tINFO " not in x]
    assert lines == [f"error: {in_process.value}"], p.stderr[-3000:]
