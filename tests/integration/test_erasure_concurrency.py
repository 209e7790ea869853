"""Bulk-erasure processes started together on one output, with request files arriving while they
run — against the moto server and against SeaweedFS (S3 over HTTP on 127.0.0.1), and on local
storage without the lease (compare-and-swap alone). Every valid request is settled exactly once as
applied, no process crashes, and the published model equals exact retraining without every
applied id (verification sample 1, ratio <= 0.05)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from deltagrad_ray import api
from deltagrad_ray.core import synthetic_classification
from tests.servers import KEY, SECRET
from deltagrad_ray.erasure import LeaseSettings, Ledger, Registry, Runs, bulk_erasure, publish_initial
from deltagrad_ray.store import location, write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
FIRST = 30          # requests waiting when the processes start
LATE = (4, 10)      # files arriving while they run × requests per file


def _rows(start: int, n: int, tag: str) -> list[dict]:
    return [{"request_id": f"{tag}-{i}", "data_id": 7 * (start + i) + 1, "timestamp": "2026-12-01T02:00:00Z"}
            for i in range(n)]


def _setup(root: str, tmp: Path):
    """Data and the base cache under ``root``, published as version 0; the first request file."""
    data = synthetic_classification(2000, 12, 3, seed=0)
    write_dataset(data, _at(root, "data/part-0.parquet"))
    base = api.fit(_at(root, "data"), _at(root, "models/current"), model="logreg", steps=60, lr=0.5, l2=0.01)
    publish_initial(base, _at(root, "models"))
    bad = [{"request_id": "bad-unknown", "data_id": 10 ** 6}, {"request_id": "bad-text", "data_id": "x"}]
    location(_at(root, "requests/batch-000.jsonl")).write_text(
        "\n".join(json.dumps(r) for r in _rows(0, FIRST, "first") + bad) + "\n")
    return base


def _at(root: str, rel: str) -> str:
    base, _, query = root.partition("?")
    return f"{base}/{rel}?{query}" if query else f"{base}/{rel}"


def _arrivals(root: str) -> threading.Thread:
    """Request files written while the runs work: the first once a plan exists, then every 0.7 s."""
    def write():
        plans = location(_at(root, "models/plans"))
        deadline = time.time() + 120
        while not plans.list() and time.time() < deadline:
            time.sleep(0.1)
        for k in range(LATE[0]):
            time.sleep(0.7)
            location(_at(root, f"requests/batch-{k + 1:03d}.jsonl")).write_text(
                "\n".join(json.dumps(r) for r in _rows(FIRST + k * LATE[1], LATE[1], f"late{k}")) + "\n")
    t = threading.Thread(target=write)
    t.start()
    return t


def _check(root: str, base) -> None:
    """Every valid request applied exactly once, the lineage unbroken, the model exact enough."""
    applied: dict[str, int] = {}
    rejected: dict[str, int] = {}
    out = _at(root, "models")
    runs = Runs(out)
    for run_id in Ledger(out).entries():
        for r in runs.plan(run_id).requests:
            d = applied if r.status == "applied" else rejected
            d[r.request_id] = d.get(r.request_id, 0) + 1
    valid = [r["request_id"] for r in _rows(0, FIRST, "first")]
    valid += [r["request_id"] for k in range(LATE[0]) for r in _rows(FIRST + k * LATE[1], LATE[1], f"late{k}")]
    assert applied == {rid: 1 for rid in valid}, {k: v for k, v in applied.items() if v != 1}
    assert rejected == {"bad-unknown": 1, "bad-text": 1}
    reg = Registry(_at(root, "models"))
    lineage = reg.lineage()
    assert [v.version for v in lineage] == list(range(len(lineage) - 1, -1, -1))
    assert len(lineage) >= 3  # the late files came after the first plan: a later version applied them
    for newer, older in zip(lineage, lineage[1:]):
        assert newer.parent.version == older.version and newer.parent.run_id == older.run_id
        assert newer.parent.record_sha256 == older.sha256()          # the hash chain holds
    published = reg.open(lineage[0])
    ids = [7 * i + 1 for i in range(FIRST + LATE[0] * LATE[1])]
    exact = api.retrain_exact(base, delete=ids)
    moved = float((exact - base.final).norm())
    assert moved > 0 and float((published.final - exact).norm()) <= 0.05 * moved
    assert int(published.removed_mask().sum()) == len(ids)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1", DELTAGRAD_NO_PROGRESS="1")
    return env


def _three_pipelines_at_once(root: str, tmp: Path) -> list[dict]:
    cfg = tmp / "be.yaml"
    cfg.write_text(yaml.safe_dump({"requests": _at(root, "requests"), "output": _at(root, "models"),
                                   "verify": {"sample": 1, "tolerance": 0.05}, "lease": {"ttl_s": 10}}))
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines.bulk_erasure", "--config", str(cfg), "--wait", "120"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    writer = _arrivals(root)
    outs = [p.communicate(timeout=300) for p in procs]
    writer.join()
    summaries = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    return summaries


@pytest.fixture
def s3_credentials(monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)


@pytest.mark.parametrize("server", ["moto_s3", "seaweed_s3"])
def test_three_bulk_erasures_at_once_on_s3(server, request, tmp_path, s3_credentials):
    s3 = request.getfixturevalue(server)
    bucket = s3.make_bucket(f"dg-conc-{server.split('_')[0]}")
    root = f"s3://{bucket}/{tmp_path.name}?endpoint_override={s3.endpoint.split('://', 1)[1]}&scheme=http"
    base = _setup(root, tmp_path)
    summaries = _three_pipelines_at_once(root, tmp_path)
    assert sum(s.get("applied", 0) for s in summaries) >= FIRST     # the processes did the work between them
    # requests that arrived after the last process looked are applied by the next run
    bulk_erasure(requests=_at(root, "requests"), output=_at(root, "models"), verify={"sample": 1},
                 lease=LeaseSettings(wait_s=30))
    _check(root, base)


RACE = """
import sys
from deltagrad_ray.erasure import bulk_erasure
bulk_erasure(requests=sys.argv[1], output=sys.argv[2], verify={"sample": 1, "tolerance": 0.05}, lease=None)
print("done")
"""


def test_three_bulk_erasures_at_once_without_the_lease(tmp_path):
    """No lease at all: the runs plan, replay and race to publish; compare-and-swap on LATEST.json
    lets one win each version, the losers plan again on top of it, and exactly-once still holds."""
    root = str(tmp_path / "store")
    base = _setup(root, tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", RACE, _at(root, "requests"), _at(root, "models")], cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    writer = _arrivals(root)
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "done", err[-3000:]
    writer.join()
    bulk_erasure(requests=_at(root, "requests"), output=_at(root, "models"), verify={"sample": 1}, lease=None)
    _check(root, base)
