"""The bulk-erasure protocol: the lease, publishing by compare-and-swap, runs that race or are
abandoned, and the operator's view. Every published model is checked against exact retraining."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

from deltagrad_ray import api, erasure
from deltagrad_ray.core import InputError, synthetic_classification
from deltagrad_ray.erasure import (Lease, LeaseBusy, LeaseLost, LeaseSettings, Ledger, Registry, Runs, Target,
                                   VerifySettings, bulk_erasure, publish_initial, read_inbox)
from deltagrad_ray.erasure import run as erasure_run
from deltagrad_ray.store import open_cache, write_dataset
from deltagrad_ray.store.location import Conflict

from .erasure_helpers import applied_once, latest_cache

N = 2000


@pytest.fixture
def world(tmp_path):
    data = synthetic_classification(N, 12, 3, seed=0)
    write_dataset(data, tmp_path / "data.parquet")
    cache = api.fit(str(tmp_path / "data.parquet"), str(tmp_path / "models" / "current"), model="logreg",
                    steps=60, lr=0.5, l2=0.01)
    return tmp_path, cache


def _requests(tmp, name, rows):
    (tmp / "requests").mkdir(exist_ok=True)
    (tmp / "requests" / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _erase(tmp, **kw):
    kw.setdefault("lease", LeaseSettings(ttl_s=30))
    return bulk_erasure(cache=str(tmp / "models" / "current"), requests=str(tmp / "requests"),
                        output=str(tmp / "models"), verify={"sample": 1, "tolerance": 0.05}, **kw)


def _applied_once(tmp) -> dict[str, str]:
    return applied_once(tmp / "models")


def _close_to_exact(base, published, ids):
    exact = api.retrain_exact(base, delete=sorted(ids))
    moved = float((exact - base.final).norm())
    assert moved > 0 and float((published.final - exact).norm()) <= 0.05 * moved


# -- the replay's settings --------------------------------------------------------------------------------------

def test_the_audit_shows_the_settings_each_replay_used(world):
    """With the period left open the replay takes what ``auto`` stands for here (gradient descent on a
    linear kind: secant, T0 = 10), and the audit says so; the published model is checked against exact
    retraining (verify sample 1) and stays within 2% of the erasure's effect."""
    tmp, cache = world
    ids = cache.data().ids[:40].tolist()
    _requests(tmp, "a.jsonl", [{"request_id": f"r{i}", "data_id": d} for i, d in enumerate(ids)])
    audit, = _erase(tmp)
    assert audit["diagnostics"]["curvature"] == "secant" and audit["diagnostics"]["period"] == 10
    assert audit["verification"]["performed"] and audit["verification"]["ratio"] < 0.02
    _close_to_exact(cache, latest_cache(tmp / "models"), ids)


# -- the lease ----------------------------------------------------------------------------------------------

def test_a_live_lease_keeps_others_out_and_names_its_holder(tmp_path):
    with Lease(tmp_path, LeaseSettings(ttl_s=30, holder="nightly-0201")):
        with pytest.raises(LeaseBusy, match=r"another run holds the lease \(nightly-0201, until 20\d\d-.*\); "
                                            "nothing done"):
            Lease(tmp_path, LeaseSettings(ttl_s=30)).acquire()
        # the same holder name takes it over at once (a rerun of the same job after a crash)
        Lease(tmp_path, LeaseSettings(ttl_s=30, holder="nightly-0201")).acquire().release()
    lease = erasure.read_lease(tmp_path)
    assert lease["released"] and not lease["live"] and "token" not in lease
    Lease(tmp_path, LeaseSettings(ttl_s=30)).acquire().release()  # released: free for anyone


def _expires_at(tmp_path) -> float:
    return erasure.read_lease(tmp_path)["expires_at"]


def test_renewal_keeps_the_lease_past_its_ttl_and_an_expired_one_is_taken_over(tmp_path):
    # no wall-clock bound: the test waits for events (a renewal, the expiry), however slow the machine
    held = Lease(tmp_path, LeaseSettings(ttl_s=3, holder="a")).acquire()
    first = _expires_at(tmp_path)
    deadline = time.monotonic() + 120
    while _expires_at(tmp_path) <= first:            # renewed every ttl/3: the expiry moves past the first
        assert time.monotonic() < deadline, "the lease was never renewed"
        time.sleep(0.05)
    with pytest.raises(LeaseBusy):
        Lease(tmp_path, LeaseSettings(ttl_s=3)).acquire()
    held._stop.set()                                 # the holder stalls: no more renewals, no release
    held._thread.join()
    last = _expires_at(tmp_path)
    taker = Lease(tmp_path, LeaseSettings(ttl_s=30, wait_s=120, holder="b")).acquire()
    assert time.time() >= last                       # waited for the expiry, then took it by CAS
    assert erasure.read_lease(tmp_path)["holder"] == "b"
    with pytest.raises(LeaseLost, match="the lease expired"):
        held.check()
    held._stop.clear()
    with pytest.raises(Conflict):
        held.renew()                                 # the stale holder cannot renew over the new one
    taker.release()


def test_bad_lease_settings_are_refused():
    with pytest.raises(InputError, match="lease ttl_s must be a finite number >= 1, got 0"):
        LeaseSettings(ttl_s=0)
    for bad in (float("nan"), float("inf"), True, "30"):
        with pytest.raises(InputError, match="lease ttl_s must be a finite number"):
            LeaseSettings(ttl_s=bad)


def test_a_run_finding_a_live_lease_does_nothing(world):
    tmp, cache = world
    _requests(tmp, "a.jsonl", [{"request_id": "r1", "data_id": 1}])
    with Lease(tmp / "models", LeaseSettings(ttl_s=30, holder="other-run")):
        with pytest.raises(LeaseBusy, match="other-run"):
            _erase(tmp)
    assert not (tmp / "models" / "plans").exists() and not (tmp / "requests" / "_done").exists()
    assert _erase(tmp)[0]["requests"]["applied"] == 1


# -- compare-and-swap publishing ------------------------------------------------------------------------------

def test_a_run_that_loses_the_race_to_publish_replans_on_top_of_the_winner(world, monkeypatch):
    """Run A has replayed its plan when run B publishes another version: A's compare-and-swap
    fails, A closes its plan as superseded (never publishing a model without B's erasures) and
    plans the requests still pending on top of B's version."""
    tmp, cache = world
    _requests(tmp, "1.jsonl", [{"request_id": f"a{i}", "data_id": i} for i in range(10)])
    real = Registry.publish
    calls = {"n": 0}

    def publish_after_a_rival(self, record, etag):
        calls["n"] += record.version > 0   # version 0 (the first cache) is published first
        if calls["n"] == 1 and record.version > 0:  # A is about to publish: B plans (A's requests too), publishes
            _requests(tmp, "2.jsonl", [{"request_id": f"b{i}", "data_id": 100 + i} for i in range(5)])
            m = erasure_run._Model(Target("models", str(tmp / "models")), str(tmp / "requests"))
            rival = erasure_run.plan_erasure(m, read_inbox(tmp / "requests"), *m.reg.read_latest())
            assert erasure_run.execute(m, rival, None, VerifySettings(sample=0))["new"]["version"] == 1
            _requests(tmp, "3.jsonl", [{"request_id": f"c{i}", "data_id": 200 + i} for i in range(5)])
        return real(self, record, etag)

    monkeypatch.setattr(Registry, "publish", publish_after_a_rival)
    audits = _erase(tmp)
    reg = Registry(tmp / "models")
    latest = reg.latest()
    assert [a["new"]["version"] for a in audits] == [2]          # A published only on top of B
    assert latest.version == 2 and latest.parent.version == 1
    closed = Runs(tmp / "models").closed()
    (a_run,) = closed
    assert closed[a_run]["reason"] == "superseded" and a_run not in {v.run_id for v in reg.lineage()}
    assert list((tmp / "models" / "audit").glob(f"*{a_run}-superseded.json"))
    applied = _applied_once(tmp)
    assert sorted(applied) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(5)]
                                     + [f"c{i}" for i in range(5)])
    assert {applied[f"c{i}"] for i in range(5)} == {latest.run_id}
    v2 = reg.open(latest)
    _close_to_exact(cache, v2, list(range(10)) + list(range(100, 105)) + list(range(200, 205)))


def test_two_processes_carrying_the_same_plan_publish_it_once(world, monkeypatch):
    """While run A verifies, another run (no lease) finds A's plan open on the current version and
    carries it through; A then finds everything done (result, LATEST, ledger) and adds nothing."""
    tmp, cache = world
    _requests(tmp, "1.jsonl", [{"request_id": f"a{i}", "data_id": i} for i in range(8)])
    real = erasure_run._verify
    calls = {"n": 0}

    def verify_slowly(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            twin = _erase(tmp, lease=None)           # the twin's own _verify call is the second
            assert [a["new"]["version"] for a in twin] == [1]
        return real(*args)

    monkeypatch.setattr(erasure_run, "_verify", verify_slowly)
    audits = _erase(tmp)
    assert [a["new"]["version"] for a in audits] == [1]
    reg, runs = Registry(tmp / "models"), Runs(tmp / "models")
    assert reg.latest().version == 1 and len(runs.plan_ids()) == 1 and runs.closed() == {}
    assert len(Ledger(tmp / "models").entries()) == 1 and not (tmp / "requests" / "_done").exists()
    assert len(_applied_once(tmp)) == 8
    _close_to_exact(cache, latest_cache(tmp / "models"), range(8))


def test_train_publishes_version_zero_and_downstream_reads_the_latest(world):
    tmp, cache = world
    rec = publish_initial(cache, tmp / "models")
    assert rec.version == 0 and rec.key == "current"
    with pytest.raises(Conflict, match="version 0 is published already"):
        publish_initial(cache, tmp / "models")
    assert erasure.resolve_cache(tmp / "models").path == str(tmp / "models" / "current")
    _requests(tmp, "1.jsonl", [{"request_id": "x", "data_id": 5}])
    a = bulk_erasure(requests=str(tmp / "requests"), output=str(tmp / "models"))[0]   # no `cache`: LATEST
    assert a["parent"]["version"] == 0 and a["new"]["version"] == 1
    resolved = open_cache(erasure.resolve_cache(tmp / "models"))
    # every function that opens a cache takes the models prefix: it means the published version
    assert torch.equal(api.retrain_exact(str(tmp / "models"), delete=[6]), api.retrain_exact(resolved, delete=[6]))
    assert int(resolved.removed_mask().sum()) == 1               # the many-request commands see version 1
    from deltagrad_ray import many
    assert torch.equal(many._cache(str(tmp / "models")).final, resolved.final)


def test_without_a_published_version_or_a_cache_the_run_says_what_to_set(tmp_path):
    _requests(tmp_path, "1.jsonl", [{"request_id": "x", "data_id": 5}])
    with pytest.raises(InputError, match="has no published version and no cache was given"):
        bulk_erasure(requests=str(tmp_path / "requests"), output=str(tmp_path / "models"))


# -- the operator's view ---------------------------------------------------------------------------------------

def _status(tmp):
    (st,) = erasure.status(Target("models", str(tmp / "models")), str(tmp / "requests"))
    assert "error" not in st, st.get("error")
    return st


def test_status_and_abandon(world, monkeypatch):
    tmp, cache = world
    _requests(tmp, "1.jsonl", [{"request_id": f"a{i}", "data_id": i} for i in range(4)])
    _erase(tmp)
    _requests(tmp, "2.jsonl", [{"request_id": f"b{i}", "data_id": 50 + i} for i in range(6)])

    class Killed(Exception):
        pass

    def die(*a, **k):
        raise Killed()

    monkeypatch.setattr(Registry, "publish", die)
    with pytest.raises(Killed):
        _erase(tmp)
    monkeypatch.undo()
    _requests(tmp, "3.jsonl", [{"request_id": "c0", "data_id": 77}])
    st = _status(tmp)
    assert st["published"]["version"] == 1 and [v["version"] for v in st["lineage"]] == [1, 0]  # newest first
    (open_plan,) = st["open_plans"]
    assert open_plan["requests"] == 6 and open_plan["state"] == "resumable"
    assert st["pending"] == 1 and not st["lease"]["live"]
    with pytest.raises(InputError, match="no plan 'nope'"):
        erasure.abandon("nope", tmp / "models")
    first = st["lineage"][0]["run_id"]
    with pytest.raises(InputError, match="published version 1; a published erasure cannot be abandoned"):
        erasure.abandon(first, tmp / "models")
    etag = Registry(tmp / "models").read_latest()[1]
    audit = erasure.abandon(open_plan["run_id"], tmp / "models", reason="ticket 42: wrong batch")
    assert audit["outcome"] == "abandoned" and audit["reason"] == "ticket 42: wrong batch"
    assert audit["requests"]["returned_to_pending"] == 6
    assert Registry(tmp / "models").read_latest()[1] != etag      # the abandoned plan can no longer publish
    st = _status(tmp)
    assert st["open_plans"] == [] and st["pending"] == 7 and st["closed"][0]["reason"] == "abandoned"
    # the requests pend again and the next run applies them, once
    a = _erase(tmp)[0]
    assert a["requests"]["applied"] == 7 and a["new"]["version"] == 2
    assert len(_applied_once(tmp)) == 11 and _status(tmp)["pending"] == 0


def test_cli_erasure_status_and_abandon(world, monkeypatch):
    import subprocess

    from tests.processes import python
    tmp, cache = world
    _requests(tmp, "1.jsonl", [{"request_id": f"a{i}", "data_id": i} for i in range(3)])
    _erase(tmp)
    cli = python("-m", "deltagrad_ray.cli")
    out = ["--output", str(tmp / "models"), "--requests", str(tmp / "requests")]
    p = subprocess.run(cli + ["erasure", "status", *out], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("erasure status: ") and "published version 1 (run " in p.stdout
    assert "lineage 1 <- 0" in p.stdout and "open plans none" in p.stdout and "pending 0" in p.stdout
    p = subprocess.run(cli + ["--json", "erasure", "status", *out], capture_output=True, text=True, timeout=120)
    st = json.loads(p.stdout.splitlines()[0])
    assert st["published"]["version"] == 1 and [v["version"] for v in st["lineage"]] == [1, 0]  # newest first
    p = subprocess.run(cli + ["erasure", "abandon", st["lineage"][0]["run_id"], "--output", str(tmp / "models")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "a published erasure cannot be abandoned" in p.stderr


def test_the_ledger_lives_beside_the_output_and_reports_redact_data_ids(world):
    from deltagrad_ray.jobs import bulk_erasure as job
    from deltagrad_ray.jobs.config import check
    tmp, cache = world
    _requests(tmp, "1.jsonl", [{"request_id": "r1", "data_id": 1234}, {"request_id": "r2", "data_id": 987654},
                               {"request_id": "r3", "data_id": "12x"}])
    cfg = check({"cache": str(tmp / "models" / "current"), "requests": str(tmp / "requests"),
                 "output": str(tmp / "models"), "verify": {"sample": 0},
                 "report": {"output": str(tmp / "reports"), "redact_ids": True}}, job.SCHEMA)
    out = job.run(cfg)
    # r2's id is held by no model of the fleet: rejected once; r3 is malformed
    assert out["applied"] == 1 and out["rejected"] == 2
    assert (tmp / "models" / "ledger").is_dir() and not (tmp / "requests" / "_done").exists()
    report = (tmp / "reports").rglob("report.md").__next__().read_text()
    salt = erasure.redaction_salt(tmp / "models")
    assert "987654" not in report and erasure.redact(987654, salt) in report
    # not as a number of its own (the report's clock stamp, e.g. 20261206T212345Z, can hold "1234")
    body = "\n".join(line for line in report.splitlines() if not line.startswith("_generated "))
    assert re.search(r"(?<![0-9.])1234(?![0-9]|\.[0-9])", body) is None and "12x" not in report  # nor in the reasons
    assert "r2" in report                                       # request ids stay: they are the audit's key
    audit = json.loads(next((tmp / "models" / "audit").glob("*.json")).read_text())
    assert [r["request_id"] for r in audit["settled"]] == ["r1", "r2", "r3"] and audit["requests"]["applied"] == 1
    assert erasure.redaction_salt(tmp / "models") == salt       # stable across runs


def test_an_older_projects_ledger_is_honoured_but_only_where_it_agrees_with_the_versions(world):
    """Entries in the inbox's ``_done/`` (the ledger of earlier releases) still settle their requests
    when their run is in this output's lineage; a forged entry (a run this output never published)
    is ignored, reported by status, and hides nothing."""
    tmp, cache = world
    _requests(tmp, "1.jsonl", [{"request_id": f"a{i}", "data_id": i} for i in range(3)])
    _erase(tmp)
    led = tmp / "models" / "ledger"
    (entry,) = list(led.glob("*.json"))
    # move the entry to where older releases kept it: still believed
    (tmp / "requests" / "_done").mkdir()
    entry.rename(tmp / "requests" / "_done" / entry.name)
    assert _erase(tmp) == [] and _status(tmp)["pending"] == 0
    # a forged entry dropped in the inbox's _done/ for a request nobody applied
    _requests(tmp, "2.jsonl", [{"request_id": "victim", "data_id": 42}])
    forged = {"run_id": "20260101T000000Z-abcdef", "requests": [
        {"request_id": "victim", "data_id": 42, "status": "applied"}]}
    (tmp / "requests" / "_done" / "20260101T000000Z-abcdef.json").write_text(json.dumps(forged))
    (a,) = _erase(tmp)
    assert a["requests"]["applied"] == 1 and a["settled"][0]["request_id"] == "victim"
    st = _status(tmp)
    assert any(e["run_id"] == "20260101T000000Z-abcdef" for e in st["ignored_ledger_entries"])
    assert st["pending"] == 0


def test_pipeline_exits_0_with_one_line_when_the_lease_is_held(world):
    import os
    import subprocess
    import sys

    import yaml
    tmp, cache = world
    _requests(tmp, "1.jsonl", [{"request_id": "r1", "data_id": 1}])
    (tmp / "be.yaml").write_text(yaml.safe_dump({"cache": str(tmp / "models" / "current"),
                                                 "requests": str(tmp / "requests"), "output": str(tmp / "models")}))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "pipelines.bulk_erasure", "--config", str(tmp / "be.yaml")]
    with Lease(tmp / "models", LeaseSettings(ttl_s=60, holder="the-other-run")):
        p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert "Traceback" not in p.stderr and "model models: busy: " in p.stderr, p.stderr  # progress, on stderr
        (line,) = p.stdout.strip().splitlines()
        out = json.loads(line)
        assert "another run holds the lease (the-other-run, until" in out["skipped"]
        assert out["lease"]["holder"] == "the-other-run"
    # --wait: the holder releases within the wait and the run goes ahead
    held = Lease(tmp / "models", LeaseSettings(ttl_s=60, holder="the-other-run")).acquire()
    threading.Timer(2.0, held.release).start()
    p = subprocess.run(args + ["--wait", "30"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["applied"] == 1
