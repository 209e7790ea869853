"""Hostile and careless locations (issue 22): credentials in a URI are refused and never repeated,
and a URI read back from a stored record cannot choose where this process sends its credentials."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from deltagrad_ray import api
from deltagrad_ray.core import InputError, synthetic_classification
from deltagrad_ray.store import location, write_dataset
from deltagrad_ray.store.location import recorded_location
from deltagrad_ray.store.s3 import S3Options, configure_s3, shown

SECRET = "Zq9SECRETv7"  # stands for a password or secret access key: must never be printed

CREDENTIAL_FORMS = [
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs/c1",                  # user:password@
    f"s3://{SECRET}@bucket/runs/c1",                                # user@
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs/c1?endpoint_override=127.0.0.1:9000&scheme=http",
    f"s3://bucket/runs/c1?secret_key={SECRET}",
    f"s3://bucket/runs/c1?access_key=AKIAEXAMPLE&secret_key={SECRET}",
    f"s3://bucket/runs/c1?region=eu-west-3&session_token={SECRET}",
    f"s3://bucket/runs/c1?AWS_SECRET_ACCESS_KEY={SECRET}",
    f"s3://bucket/runs/c1?X-Amz-Signature={SECRET}",
    f"s3://bucket/runs/c1?password={SECRET}",
    f"s3://bucket/runs/c1?endpoint_override=AKIAEXAMPLE:{SECRET}@127.0.0.1:9000&scheme=http",
    f"file://user:{SECRET}@localhost/tmp/x",
    f"https://user:{SECRET}@example.com/x",
    f"AKIAEXAMPLE:{SECRET}@bucket/runs/c1",                         # s3:// forgotten
]


@pytest.fixture
def no_s3_settings(monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    from deltagrad_ray.store import s3
    monkeypatch.setattr(s3, "_configured", S3Options())


@pytest.mark.parametrize("uri", CREDENTIAL_FORMS)
def test_credentials_in_a_location_are_refused_without_repeating_them(no_s3_settings, uri):
    with pytest.raises(InputError) as e:
        location(uri)
    message = str(e.value)
    assert SECRET not in message and "\n" not in message
    assert "credentials in a" in message or "unsupported location" in message, message


@pytest.mark.parametrize("uri, message", [
    (f"s3://bucket/x?Weird-Key={SECRET}", r"s3://bucket/x: unknown S3 setting \(a key not shown\) in the query"),
    (f"s3://bucket/x?endpoint={SECRET}", r"s3://bucket/x: unknown S3 setting 'endpoint' in the query"),
    (f"s3://bucket/x?{SECRET}", r"s3://bucket/x: credentials in a location are refused"),  # a key alone
    ("s3://bucket/x?region=eu-west-3&region=us-east-1", "the S3 setting 'region' is given twice"),
    ("s3://bucket/x?region=", "the S3 setting 'region' has no value"),
    (f"s3://bucket/x#{SECRET}", r"'#' is not supported in an S3 location"),
    (f"file:///tmp/x?secret_key={SECRET}", "a file URI takes no query or fragment"),
    (f"gs://bucket/x?token={SECRET}", r"unsupported location 'gs://bucket/x'"),
    ("s3://[bucket/x", "not a valid location"),
])
def test_careless_queries_are_one_line_errors_that_repeat_no_value(no_s3_settings, uri, message):
    with pytest.raises(InputError, match=message) as e:
        location(uri)
    assert SECRET not in str(e.value)


@pytest.mark.parametrize("endpoint", [f"http://AKIAEXAMPLE:{SECRET}@127.0.0.1:9000", f"http://{SECRET}@minio:9000",
                                      f"http://127.0.0.1:9000/?secret_key={SECRET}", "ftp://127.0.0.1:9000"])
def test_endpoints_with_credentials_are_refused_wherever_they_come_from(no_s3_settings, monkeypatch, tmp_path,
                                                                        endpoint):
    with pytest.raises(InputError) as e:                 # --endpoint-url, a config's s3: block
        configure_s3(endpoint=endpoint)
    assert SECRET not in str(e.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)     # the environment
    with pytest.raises(InputError, match="AWS_ENDPOINT_URL") as e:
        location("s3://bucket/x")
    assert SECRET not in str(e.value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    (tmp_path / "config").write_text(f"[profile lab]\nendpoint_url = {endpoint}\n")  # an AWS profile
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    with pytest.raises(InputError, match="endpoint_url of the AWS profile 'lab'") as e:
        location("s3://bucket/x?profile=lab")
    assert SECRET not in str(e.value)


def test_locations_without_credentials_still_work(no_s3_settings):
    loc = location("s3://bucket/runs/c1?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-3&profile=lab")
    assert (loc.uri, loc.endpoint) == ("s3://bucket/runs/c1", "http://127.0.0.1:9000")
    assert location("file:///tmp/my%20data/x.parquet").path == "/tmp/my data/x.parquet"
    assert location("runs/a@b?c").path.endswith("runs/a@b?c")  # a plain path is taken literally
    assert shown(f"s3://AK:{SECRET}@bucket/x?secret_key={SECRET}") == "s3://***@bucket/x"


# -- stored URIs --------------------------------------------------------------------------------------
ELSEWHERE = "s3://bucket/data?endpoint_override=10.1.2.3:80&scheme=http"


def test_a_stored_uri_keeps_its_settings_only_when_they_are_the_operators(no_s3_settings):
    # nothing given by the operator: the stored endpoint is ignored (the environment's AWS S3 is used)
    loc = recorded_location(ELSEWHERE)
    assert loc.uri == "s3://bucket/data" and "10.1.2.3" not in loc.endpoint and loc.portable_uri == "s3://bucket/data"
    # read from a cache at another endpoint: ignored too, the cache's settings do not transfer to it
    cache = location("s3://bucket/runs/c1?endpoint_override=127.0.0.1:9000&scheme=http")
    assert "10.1.2.3" not in recorded_location(ELSEWHERE, cache).endpoint
    # the same endpoint as the location it was read from (e.g. a Ray actor handed the cache's URI): kept
    same = location("s3://bucket/runs/c1?endpoint_override=10.1.2.3:80&scheme=http")
    assert recorded_location(ELSEWHERE, same).endpoint == "http://10.1.2.3:80"
    # the operator's --endpoint-url: kept
    configure_s3(endpoint="http://10.1.2.3:80")
    assert recorded_location(ELSEWHERE).portable_uri == "s3://bucket/data?endpoint_override=10.1.2.3:80&scheme=http"
    # a stored URI naming another endpoint than the operator's resolves at the operator's
    assert recorded_location("s3://bucket/data?endpoint_override=evil:80&scheme=http").endpoint == "http://10.1.2.3:80"
    # local paths and URIs without settings as location() makes them; credentials refused as anywhere
    assert recorded_location("/tmp/data.parquet").path == "/tmp/data.parquet"
    with pytest.raises(InputError, match="credentials in a location are refused"):
        recorded_location(f"s3://AK:{SECRET}@bucket/data")


class _Listener:
    """A plain TCP listener on 127.0.0.1 that records whether anybody tried to connect."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        return self

    def contacted(self) -> bool:
        self.sock.settimeout(0.3)  # a connection attempt is completed by the kernel and waits to be accepted
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            return False
        conn.close()
        return True

    def __exit__(self, *exc):
        self.sock.close()


def _cli(*args, env, cwd):
    return subprocess.run([sys.executable, "-m", "deltagrad_ray.cli", "--json", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _env(server) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key, AWS_REGION="us-east-1",
               PYTHONWARNINGS="ignore", DELTAGRAD_NO_PROGRESS="1")
    return env


def _edit_data_uri(manifest: dict, uri: str) -> str:
    manifest["data"]["uri"] = uri
    return json.dumps(manifest)


@pytest.fixture
def moto_credentials(moto_s3, no_s3_settings, monkeypatch):
    """The test server's credentials in this process's environment, and no endpoint (it is given explicitly)."""
    for k, v in _env(moto_s3).items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    return moto_s3


def test_an_edited_manifest_does_not_send_requests_elsewhere(moto_credentials, tmp_path):
    """A cache whose manifest (on S3, or on local disk) was edited so its data URI names another
    endpoint over plain HTTP: the command reads the data where the operator said (--endpoint-url),
    with one warning line, and never connects to the other endpoint."""
    moto_s3 = moto_credentials
    bucket = moto_s3.make_bucket("dg-stored")
    host = moto_s3.endpoint.split("://", 1)[1]
    data = synthetic_classification(300, 5, 3, seed=1)
    write_dataset(data, f"s3://{bucket}/data/part-0.parquet?endpoint_override={host}&scheme=http")
    ours = f"?endpoint_override={host}&scheme=http"
    api.fit(f"s3://{bucket}/data{ours}", f"s3://{bucket}/runs/c1{ours}", model="logreg", steps=10, lr=0.3)
    api.fit(f"s3://{bucket}/data{ours}", str(tmp_path / "local"), model="logreg", steps=10, lr=0.3)
    (tmp_path / "ids.txt").write_text("\n".join(str(int(i)) for i in data.ids[:3]))
    env = _env(moto_s3)
    with _Listener() as bait:
        elsewhere = f"s3://{bucket}/data?endpoint_override=127.0.0.1:{bait.port}&scheme=http"
        on_s3 = location(f"s3://{bucket}/runs/c1/manifest.json{ours}")
        on_s3.write_text(_edit_data_uri(json.loads(on_s3.read_text()), elsewhere), overwrite=True)
        local = tmp_path / "local" / "manifest.json"
        local.write_text(_edit_data_uri(json.loads(local.read_text()), elsewhere))
        for cache in (f"s3://{bucket}/runs/c1", str(tmp_path / "local")):
            p = _cli("--endpoint-url", moto_s3.endpoint, "unlearn", "--cache", cache, "--delete", "ids.txt", "--out",
                     f"u{len(cache)}.safetensors", env=env, cwd=tmp_path)
            assert p.returncode == 0, p.stderr[-2000:]
            assert f"s3://{bucket}/data: the S3 settings stored with this location" in p.stderr
            assert f"reading it at {moto_s3.endpoint}" in p.stderr
            assert moto_s3.secret_key not in p.stdout + p.stderr
        assert not bait.contacted()


def test_stored_settings_the_operator_gave_are_still_used(moto_credentials, tmp_path):
    """A local cache trained on data whose endpoint was given in its query: the manifest records the
    query, and a later command with the same --endpoint-url reads the data there, with no warning;
    without it the stored endpoint is not used (the environment's endpoint is)."""
    moto_s3 = moto_credentials
    bucket = moto_s3.make_bucket("dg-stored-ok")
    host = moto_s3.endpoint.split("://", 1)[1]
    data = synthetic_classification(300, 5, 3, seed=2)
    env = _env(moto_s3)
    write_dataset(data, f"s3://{bucket}/data/part-0.parquet?endpoint_override={host}&scheme=http")
    (tmp_path / "ids.txt").write_text("\n".join(str(int(i)) for i in data.ids[:3]))
    p = _cli("train", "--data", f"s3://{bucket}/data?endpoint_override={host}&scheme=http", "--model", "logreg",
             "--steps", "10", "--lr", "0.3", "--cache", "c1", env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    manifest = json.loads((tmp_path / "c1" / "manifest.json").read_text())
    assert manifest["data"]["uri"] == f"s3://{bucket}/data?endpoint_override={host}&scheme=http"
    p = _cli("--endpoint-url", moto_s3.endpoint, "unlearn", "--cache", "c1", "--delete", "ids.txt", "--out",
             "u.safetensors", env=env, cwd=tmp_path)
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr[-2000:]
    with socket.socket() as sock:  # a port nobody listens on: the operator's environment names it
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    p = _cli("unlearn", "--cache", "c1", "--delete", "ids.txt", "--out", "v.safetensors", cwd=tmp_path,
             env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}"})
    assert p.returncode == 3, p.stderr[-2000:]
    assert f"the S3 settings stored with this location ({host_query(host)}) are not the ones given" in p.stderr
    assert f"reading it at http://127.0.0.1:{closed}" in p.stderr and p.stderr.count("\n") == 2, p.stderr


def host_query(host: str) -> str:
    return f"endpoint_override={host}&scheme=http"
