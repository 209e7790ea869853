"""S3 settings travel with locations: portable URIs, and the CLI's flags reaching Ray actors.

No AWS_ENDPOINT_URL anywhere here: the endpoint is given on the command line (or in a URI's
query) and must reach every process through the URIs it is handed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deltagrad_ray.core import InputError, synthetic_classification
from deltagrad_ray.store import location, write_dataset
from deltagrad_ray.store.s3 import S3Options, configure_s3

ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture
def no_endpoint_env(monkeypatch):
    for k in ENDPOINT_VARS:
        monkeypatch.delenv(k, raising=False)
    from deltagrad_ray.store import s3
    monkeypatch.setattr(s3, "_configured", S3Options())


def test_portable_uri_carries_the_given_settings_and_never_credentials(no_endpoint_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    loc = location("s3://bkt/runs/c1?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-3&profile=lab")
    assert loc.uri == "s3://bkt/runs/c1"                        # messages: the short URI
    assert loc.endpoint == "http://127.0.0.1:9000"
    portable = loc.portable_uri
    assert portable == "s3://bkt/runs/c1?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-3&profile=lab"
    assert location(portable).portable_uri == portable            # a round trip
    child = loc.join("shards", "part-0.parquet")
    assert child.portable_uri.startswith("s3://bkt/runs/c1/shards/part-0.parquet?endpoint_override=127.0.0.1:9000")
    assert "very-secret" not in portable + repr(loc) + repr(loc.s3)
    # pickled (into a Ray task, say) it is its portable URI: credentials stay behind
    import pickle
    raw = pickle.dumps(loc)
    assert b"very-secret" not in raw and pickle.loads(raw).portable_uri == portable


def test_settings_from_configure_s3_travel_but_the_environments_do_not(no_endpoint_env, monkeypatch):
    monkeypatch.setenv("AWS_REGION", "ap-south-1")               # each node reads its own environment
    assert location("s3://bkt/x").portable_uri == "s3://bkt/x"
    configure_s3(endpoint="http://127.0.0.1:9000", profile="lab")  # the CLI's --endpoint-url, --profile
    loc = location("s3://bkt/x")
    assert loc.portable_uri == "s3://bkt/x?endpoint_override=127.0.0.1:9000&scheme=http&profile=lab"
    assert loc.s3.options.region == "ap-south-1"                 # in effect here, not carried
    # the URI's query wins over the process-wide settings
    assert location("s3://bkt/x?endpoint_override=h:1&scheme=https").endpoint == "https://h:1"
    # local paths travel as absolute paths
    assert location("rel/dir").portable_uri == os.path.abspath("rel/dir")


@pytest.mark.parametrize("uri, message", [
    ("s3://bkt/x?endpoint=h:1", "unknown S3 setting 'endpoint' in the query; expected endpoint_override"),
    ("s3://bkt/x?endpoint_override=h:1&scheme=ftp", "scheme must be http or https, got 'ftp'"),
])
def test_bad_s3_queries_are_one_line_errors(no_endpoint_env, uri, message):
    with pytest.raises(InputError, match=message):
        location(uri)


def _env_without_endpoint(server) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENDPOINT_VARS}
    env.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", DELTAGRAD_NO_PROGRESS="1")
    return env


def _cluster_endpoint_vars(ray_cluster) -> set[str]:
    """The AWS_ENDPOINT_URL* variables seen by a task on each node of the test cluster."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def seen() -> list[str]:
        return [k for k in os.environ if k.startswith("AWS_ENDPOINT_URL")]

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    refs = [seen.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes]
    return {k for found in ray.get(refs) for k in found}


@pytest.mark.slow
def test_cli_endpoint_flag_reaches_ray_actors_with_no_endpoint_in_any_environment(ray_cluster, moto_s3,
                                                                                  no_endpoint_env, tmp_path):
    """`loo --backend ray --endpoint-url …`: cache and data on the moto server, no AWS_ENDPOINT_URL in
    the CLI's environment nor in any process of the Ray cluster; the results equal the serial backend.
    (Before settings travelled with locations, the actors looked for the cache on AWS itself.)"""
    from deltagrad_ray.results import read_table
    assert _cluster_endpoint_vars(ray_cluster) == set()
    bucket = moto_s3.make_bucket("dg-travel")
    host = moto_s3.endpoint.split("://", 1)[1]
    data = synthetic_classification(600, 8, 3, seed=3)
    write_dataset(data, f"s3://{bucket}/data/part-0.parquet?endpoint_override={host}&scheme=http")
    env = _env_without_endpoint(moto_s3)
    flags = [sys.executable, "-m", "deltagrad_ray.cli", "--json", "--endpoint-url", moto_s3.endpoint]
    p = subprocess.run(flags + ["train", "--data", f"s3://{bucket}/data", "--model", "logreg", "--steps", "30",
                                "--lr", "0.5", "--l2", "0.01", "--shard-steps", "10",
                                "--cache", f"s3://{bucket}/runs/c1"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    manifest = json.loads(location(f"s3://{bucket}/runs/c1/manifest.json?endpoint_override={host}&scheme=http")
                          .read_text())
    # the data URI recorded in the manifest carries the endpoint it was read from
    assert manifest["data"]["uri"] == f"s3://{bucket}/data?endpoint_override={host}&scheme=http"
    (tmp_path / "ids.txt").write_text("\n".join(str(int(i)) for i in data.ids[:12]))
    outs = {}
    for backend in ("serial", "ray"):
        args = ["loo", "--cache", f"s3://{bucket}/runs/c1", "--ids", str(tmp_path / "ids.txt"), "--batch-size", "4",
                "--backend", backend, "--out", str(tmp_path / f"{backend}.parquet")]
        if backend == "ray":
            args += ["--address", ray_cluster.address, "--workers", "2", "--mode", "pipeline"]
        p = subprocess.run(flags + args, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert json.loads(p.stdout.strip().splitlines()[-1])["backend"] == backend
        assert moto_s3.secret_key not in p.stdout + p.stderr
        outs[backend] = torch.tensor(read_table(tmp_path / f"{backend}.parquet")[0].column("params").to_pylist())
    assert torch.allclose(outs["serial"], outs["ray"], rtol=1e-12, atol=0)
    assert float(outs["ray"].std(0).norm()) > 0                 # twelve different models, not one
    assert _cluster_endpoint_vars(ray_cluster) == set()
