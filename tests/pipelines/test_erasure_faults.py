"""Bulk erasure killed after every storage write, in turn, then run again — on local storage and on
S3 (moto over HTTP). The fault hook (DELTAGRAD_FAULT_AFTER_WRITE=k) SIGKILLs the pipeline process
right after its k-th write (plan, lease, each cache file, result, LATEST, version record, audit,
ledger, release); the rerun must finish the work with every request applied exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from deltagrad_ray import api, erasure
from deltagrad_ray.core import synthetic_classification
from deltagrad_ray.erasure import LeaseSettings, Ledger, Registry, Runs, Target, bulk_erasure, publish_initial
from deltagrad_ray.store import location, write_dataset

from ..processes import assert_same_across_processes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
HOLDER = "nightly-fault-test"   # the rerun is the same job: it takes over the dead run's lease at once
BATCH_2 = [{"request_id": f"b{i}", "data_id": 40 + 3 * i} for i in range(15)] + [
    {"request_id": "b-unknown", "data_id": 10 ** 7}, {"request_id": "b0", "data_id": 40},
    {"request_id": "b-text", "data_id": "seven"}]


class Storage:
    """A template output (version 1 published, batch 2 pending) and fresh copies of it."""

    def __init__(self, root: str, copy) -> None:
        self.root, self._copy = root.rstrip("/"), copy

    def uri(self, prefix: str, *parts: str) -> str:
        base, _, query = self.root.partition("?")
        path = "/".join([base, prefix, *parts])
        return f"{path}?{query}" if query else path

    def copy(self, k: int) -> str:
        return self._copy(f"k{k:03d}")


def _template(storage: Storage, tmp: Path):
    data = synthetic_classification(2000, 12, 3, seed=0)
    write_dataset(data, tmp / "data.parquet")
    t = lambda *p: storage.uri("tmpl", *p)  # noqa: E731
    base = api.fit(str(tmp / "data.parquet"), t("models", "current"), model="logreg", steps=60, lr=0.5, l2=0.01)
    publish_initial(base, t("models"))
    location(t("requests", "batch-1.jsonl")).write_text(
        "\n".join(json.dumps({"request_id": f"a{i}", "data_id": i}) for i in range(5)) + "\n")
    bulk_erasure(requests=t("requests"), output=t("models"), verify={"sample": 0}, lease=LeaseSettings(holder=HOLDER))
    location(t("requests", "batch-2.jsonl")).write_text("\n".join(json.dumps(r) for r in BATCH_2) + "\n")
    return base


def _config(storage: Storage, prefix: str, tmp: Path) -> str:
    path = tmp / f"{prefix}.yaml"
    path.write_text(yaml.safe_dump({
        "requests": storage.uri(prefix, "requests"), "output": storage.uri(prefix, "models"),
        "verify": {"sample": 1, "tolerance": 0.05}, "lease": {"ttl_s": 600, "holder": HOLDER}}))
    return str(path)


def _check_after_rerun(storage: Storage, prefix: str, base, exact: torch.Tensor, version_before: int) -> None:
    out, req = storage.uri(prefix, "models"), storage.uri(prefix, "requests")
    reg, runs = Registry(out), Runs(out)
    latest = reg.latest()
    assert latest.version == 2 and version_before in (1, 2)      # LATEST only moved forward
    assert [v.version for v in reg.lineage()] == [2, 1, 0]
    for rec in reg.lineage():                                     # every published version loads, unchanged
        assert torch.isfinite(reg.open(rec).final).all()
    applied: dict[str, int] = {}
    other: dict[str, str] = {}
    for run_id in Ledger(out).entries():
        for r in runs.plan(run_id).requests:
            if r.status == "applied":
                applied[r.request_id] = applied.get(r.request_id, 0) + 1
            else:
                assert r.request_id not in other, f"{r.request_id} settled twice"
                other[r.request_id or r.source] = r.status
    assert applied == {**{f"a{i}": 1 for i in range(5)}, **{f"b{i}": 1 for i in range(15)}}, applied
    assert other == {"b-unknown": "not present", "b0": "duplicate", "b-text": "rejected"}, other
    (st,) = erasure.status(Target("m", out), req)
    assert "error" not in st and st["open_plans"] == [] and st["pending"] == 0 and not st["lease"]["live"]
    published = reg.open(latest)
    moved = float((exact - base.final).norm())
    assert float((published.final - exact).norm()) <= 0.05 * moved


def _kill_at_every_write(storage: Storage, tmp: Path, env: dict) -> int:
    base = _template(storage, tmp)
    exact = api.retrain_exact(base, delete=list(range(5)) + [40 + 3 * i for i in range(15)])
    models = []
    k = 0
    while True:
        k += 1
        prefix = storage.copy(k)
        p = subprocess.run([sys.executable, "-m", "pipelines.bulk_erasure", "--config", _config(storage, prefix, tmp)],
                           cwd=ROOT, env={**env, "DELTAGRAD_FAULT_AFTER_WRITE": str(k)}, capture_output=True,
                           text=True, timeout=300)
        if p.returncode == 0:  # the run made fewer than k writes: every write has been a kill point
            assert json.loads(p.stdout.strip().splitlines()[-1])["applied"] == 15
            break
        assert p.returncode == -9 and f"fault hook: killed after storage write {k} " in p.stderr, p.stderr[-2000:]
        before = Registry(storage.uri(prefix, "models")).latest().version
        audits = bulk_erasure(requests=storage.uri(prefix, "requests"), output=storage.uri(prefix, "models"),
                              verify={"sample": 1, "tolerance": 0.05}, lease=LeaseSettings(ttl_s=600, holder=HOLDER))
        assert sum(a["requests"].get("applied", 0) for a in audits) in (0, 15)
        _check_after_rerun(storage, prefix, base, exact, before)
        assert bulk_erasure(requests=storage.uri(prefix, "requests"), output=storage.uri(prefix, "models"),
                            lease=LeaseSettings(holder=HOLDER)) == []   # nothing pends
        reg = Registry(storage.uri(prefix, "models"))
        rec = reg.latest()
        models.append((k, reg.open(rec).final, rec.method, rec.certificate or {}))
    # a resumed run publishes what an uninterrupted one does (to round-off: some of these models were
    # computed by the killed job processes, the others here; tests/processes.py), with the same method
    # and certificate: a replay committed before the kill keeps its error estimate (its cache logged it),
    # so the policy decides as it would have (before, a kill between the replay's commit and its result
    # published the replay with its drift unknown)
    reg = Registry(storage.uri(prefix, "models"))
    rec = reg.latest()
    clean, method, cert = reg.open(rec).final, rec.method, rec.certificate or {}
    assert cert.get("drift_estimate") is not None
    for k, m, m_method, m_cert in models:
        assert m_method == method and m_cert.get("reconciled") == cert.get("reconciled"), (k, m_method, m_cert)
        for key in ("error_estimate", "drift_estimate"):  # 4 significant digits, computed in two processes
            assert m_cert.get(key) == pytest.approx(cert.get(key), rel=1e-3), (k, key, m_cert)
        assert_same_across_processes(m, clean, f"killed after write {k}")
    return k - 1


def test_killed_after_every_write_on_local_storage(tmp_path):
    root = tmp_path / "store"

    def copy(prefix: str) -> str:
        shutil.copytree(root / "tmpl", root / prefix)
        return prefix
    kills = _kill_at_every_write(Storage(str(root), copy), tmp_path, {**os.environ, "PYTHONWARNINGS": "ignore"})
    assert kills >= 12  # lease, plan, the cache's files, result, LATEST, version, audit, ledger, release


def test_killed_after_every_write_on_s3(tmp_path, moto_s3, monkeypatch):
    bucket = "dg-faults"
    moto_s3.make_bucket(bucket)
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_s3.access_key)        # credentials from the environment,
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_s3.secret_key)    # the endpoint in every URI
    host = moto_s3.endpoint.split("://", 1)[1]
    client = moto_s3.client()

    def copy(prefix: str) -> str:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="tmpl/"):
            for obj in page.get("Contents", []):
                client.copy_object(Bucket=bucket, Key=prefix + obj["Key"][len("tmpl"):],
                                   CopySource={"Bucket": bucket, "Key": obj["Key"]})
        return prefix
    storage = Storage(f"s3://{bucket}?endpoint_override={host}&scheme=http", copy)
    kills = _kill_at_every_write(storage, tmp_path, {**os.environ, "PYTHONWARNINGS": "ignore"})
    assert kills >= 12
