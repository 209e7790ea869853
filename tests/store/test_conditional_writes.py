"""Create-only writes and compare-and-swap, on local files and on a real S3 server (moto over HTTP),
and the fault hook that kills a process after its k-th storage write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from deltagrad_ray.store.location import Conflict, location


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch):
    if request.param == "local":
        return location(str(tmp_path / "ctl"))
    server = request.getfixturevalue("moto_s3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)      # credentials from the environment,
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)  # the endpoint from the URI
    bucket = "dg-cas"
    try:
        server.make_bucket(bucket)
    except OSError:
        pass  # made by an earlier parameter
    host = server.endpoint.split("://", 1)[1]
    return location(f"s3://{bucket}/{tmp_path.name}?endpoint_override={host}&scheme=http")


def test_create_is_create_only(root):
    loc = root.join("plan.json")
    etag = loc.create(b"first")
    assert loc.read_versioned() == (b"first", etag)
    with pytest.raises(Conflict, match="plan.json: already exists; refusing to overwrite it"):
        loc.create(b"second")
    with pytest.raises(Conflict, match="already exists"):
        loc.write_bytes(b"second")
    assert loc.read_bytes() == b"first"
    assert root.join("none").read_versioned() is None


def test_replace_is_compare_and_swap(root):
    loc = root.join("LATEST.json")
    e1 = loc.create(b"v1")
    e2 = loc.replace(b"v2", if_match=e1)
    assert e2 != e1 and loc.read_versioned() == (b"v2", e2)
    with pytest.raises(Conflict, match="LATEST.json: changed since it was read; not replaced"):
        loc.replace(b"v3", if_match=e1)                      # a stale ETag loses
    assert loc.read_bytes() == b"v2"
    with pytest.raises(Conflict):
        root.join("gone.json").replace(b"x", if_match=e2)   # nothing to compare with


def test_racing_writers_one_create_wins_and_no_increment_is_lost(root):
    """Eight threads create the same object (one wins), then increment a counter by CAS: every
    successful swap is counted once."""
    target, counter = root.join("race.json"), root.join("counter.json")
    counter.create(b"0")
    wins, swaps = [], []

    def work(i: int) -> None:
        try:
            target.create(f"writer {i}".encode())
            wins.append(i)
        except Conflict:
            pass
        for _ in range(3):
            while True:
                raw, etag = counter.read_versioned()
                try:
                    counter.replace(str(int(raw) + 1).encode(), if_match=etag)
                    swaps.append(i)
                    break
                except Conflict:
                    continue

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and target.read_bytes() == f"writer {wins[0]}".encode()
    assert int(counter.read_bytes()) == len(swaps) == 24


FAULTY = """
import sys
from deltagrad_ray.store.location import location
root = location(sys.argv[1])
for i in range(6):
    root.join(f"obj-{i}").write_bytes(b"x")
print("all written")
"""


def test_fault_hook_kills_the_process_after_the_kth_write(root):
    env = {**os.environ, "DELTAGRAD_FAULT_AFTER_WRITE": "3", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", FAULTY, root.portable_uri], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -9, p.stderr                      # SIGKILL: no cleanup, no finally
    assert "fault hook: killed after storage write 3" in p.stderr and "all written" not in p.stdout
    assert [f.name for f in root.list()] == ["obj-0", "obj-1", "obj-2"]
    env["DELTAGRAD_FAULT_AFTER_WRITE"] = "0"
    p = subprocess.run([sys.executable, "-c", FAULTY, root.join("again").portable_uri], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "DELTAGRAD_FAULT_AFTER_WRITE must be an integer >= 1, got '0'" in p.stderr


def test_portable_uri_of_s3_reaches_a_process_without_settings(root):
    """The portable URI alone (no AWS_ENDPOINT_URL in the child) reaches the same object."""
    root.join("hello.json").create(json.dumps({"a": 1}).encode())
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    code = "import sys; from deltagrad_ray.store import location; print(location(sys.argv[1]).read_text())"
    p = subprocess.run([sys.executable, "-c", code, root.join("hello.json").portable_uri], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"a": 1}
