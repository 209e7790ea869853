"""Fleet erasure end to end: four models (logistic regression, least squares, an MLP and a second
logistic regression) on overlapping slices of one user table, fed from one request inbox over three
runs, each model's erasure a task on a local multi-node Ray cluster, every object on S3 (the moto
server over HTTP). One model's task is killed mid-run, one model's output is damaged for a run: the
others finish, the damaged one catches up after the repair, nothing is applied twice, and every
published model is compared with exact retraining of its first version without its erased ids."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from deltagrad_ray import api, erasure
from deltagrad_ray.core import DeltaGradConfig, Dataset, synthetic_classification, synthetic_regression
from deltagrad_ray.erasure import (Fleet, LeaseSettings, Ledger, Registry, Runs, Settings, Target, VerifySettings,
                                   erase_fleet)
from deltagrad_ray.runtime import EXIT_OK, EXIT_PARTIAL
from deltagrad_ray.store import location, write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.integration]

N, D = 1500, 10
# name → (model kind, the table's rows it was trained on, fit settings)
MODELS = {
    "churn": ("logreg", (0, 900), {"steps": 60, "lr": 0.5, "l2": 0.01}),
    "ltv": ("linear", (300, 1200), {"steps": 60, "lr": 0.2, "l2": 0.01}),
    "fraud": ("mlp", (600, 1500), {"steps": 300, "lr": 0.3, "l2": 0.01, "hidden": [8]}),
    "risk": ("logreg", (0, 1500), {"steps": 60, "lr": 0.5, "l2": 0.01}),
}
NOBODY = 10 ** 6                        # an id no model holds
BATCHES = [                             # (request id, data id) per run
    [("r1-0", 5), ("r1-1", 350), ("r1-2", 650), ("r1-3", 1000), ("r1-4", 1400), ("r1-x", NOBODY)],
    [("r2-0", 10), ("r2-1", 400), ("r2-2", 700), ("r2-3", 1100), ("r2-4", 1450), ("r2-5", 899), ("r2-6", 900)],
    [("r3-0", 20), ("r3-1", 450), ("r3-2", 800), ("r3-3", 1200), ("r3-4", 1300), ("r3-5", 1199)],
]


def _holds(name: str, data_id: int) -> bool:
    lo, hi = MODELS[name][1]
    return lo <= data_id < hi


@pytest.fixture
def fleet_world(tmp_path, moto_s3, ray_cluster, monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_s3.secret_key)
    bucket = moto_s3.make_bucket("dg-fleet")
    query = f"endpoint_override={moto_s3.endpoint.split('://', 1)[1]}&scheme=http"

    def at(rel: str) -> str:
        return f"s3://{bucket}/{tmp_path.name}/{rel}?{query}"
    table = synthetic_classification(N, D, 3, seed=0)
    targets = synthetic_regression(N, D, seed=1).y           # the same users' spend, for the linear model
    bases, fleet = {}, []
    for name, (kind, (lo, hi), fit) in MODELS.items():
        rows = torch.arange(lo, hi)
        part = table.rows(rows)
        if kind == "linear":
            part = Dataset(part.X, targets[rows], part.ids)
        write_dataset(part, tmp_path / f"{name}.parquet")
        location(at(f"data/{name}/part-0.parquet")).write_bytes((tmp_path / f"{name}.parquet").read_bytes())
        bases[name] = api.fit(at(f"data/{name}"), at(f"models/{name}/current"), model=kind, **fit)
        config = DeltaGradConfig.from_dict({"period": 2} if kind == "mlp" else {})
        fleet.append(Target(name, at(f"models/{name}"), at(f"models/{name}/current"), deltagrad=config,
                            num_cpus=1))
    settings = Settings(VerifySettings(sample=1.0, tolerance=0.05), LeaseSettings(ttl_s=120, holder="fleet-test"))
    return Fleet(at("requests"), tuple(fleet), settings), bases, at


def _drop(at, k: int) -> None:
    rows = [{"request_id": r, "data_id": i} for r, i in BATCHES[k]]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    if k == 0:
        text += '{"request_id": "r1-bad", "data_id": Infinity}\n{"request_id": "r1-0", "data_id": 5}\n'
    location(at(f"requests/batch-{k}.jsonl")).write_text(text)


def _kill_task_of(model: str, stop: threading.Event) -> list[int]:
    """SIGKILL the worker running ``model``'s erasure task once it runs (a node's process lost)."""
    from ray.util.state import list_tasks
    killed: list[int] = []
    while not stop.is_set() and not killed:
        for t in list_tasks(filters=[("name", "=", f"erasure:{model}"), ("state", "=", "RUNNING")], detail=True):
            if t.worker_pid:
                os.kill(t.worker_pid, signal.SIGKILL)
                killed.append(t.worker_pid)
                break
        time.sleep(0.05)
    return killed


def _applied(target: Target) -> dict[str, int]:
    """request id → how many settled runs of the model applied it."""
    out: dict[str, int] = {}
    runs = Runs(target.output)
    for run_id in Ledger(target.output).entries():
        for r in runs.plan(run_id).requests:
            if r.status == "applied":
                out[r.request_id] = out.get(r.request_id, 0) + 1
    return out


def test_a_fleet_erases_every_id_from_every_model_that_holds_it(fleet_world, ray_cluster):
    fleet, bases, at = fleet_world
    by_name = {t.name: t for t in fleet.models}
    verdicts: dict[str, list[str]] = {}

    def run(**kw):
        res = erase_fleet(fleet, address=ray_cluster.address, workers=2, **kw)
        for row in res.table():
            verdicts.setdefault(row["request_id"] or row["source"], []).append(row["verdict"])
        return res

    # run 1: the first batch (a malformed row and a duplicate among it)
    _drop(at, 0)
    first = run()
    assert first.exit_code() == EXIT_OK and {o.status for o in first.outcomes} == {"done"}
    # run 2: the MLP's task is killed mid-run; Ray runs it again and it resumes from its markers
    _drop(at, 1)
    stop = threading.Event()
    killed: list[int] = []
    killer = threading.Thread(target=lambda: killed.extend(_kill_task_of("fraud", stop)))
    killer.start()
    second = run()
    stop.set()
    killer.join()
    assert killed, "the fraud model's task was never seen running"
    assert second.exit_code() == EXIT_OK, second.summary()
    # run 3: the risk model's lease file is damaged: it fails, the others finish (exit 4: partial)
    _drop(at, 2)
    lease = location(at("models/risk/_lease.json"))
    lease.write_bytes(b'{"holder": ', overwrite=True)
    third = run()
    assert third.exit_code() == EXIT_PARTIAL and list(third.failed) == ["risk"], third.summary()
    assert "_lease.json" in third.failed["risk"]
    (st,) = [s for s in erasure.status(list(fleet.models), fleet.requests) if s["model"] == "risk"]
    assert "_lease.json" in st["error"]                                   # status names the damaged file
    rows = [r for r in third.table() if r["model"] == "risk"]
    assert rows and all(r["status"] == "pending" for r in rows)          # its requests pend for it
    lease.delete()                                                        # the repair the message asks for
    (st,) = [s for s in erasure.status(list(fleet.models), fleet.requests) if s["model"] == "risk"]
    assert st["last_failure"]["kind"] == "storage" and st["pending"] > 0
    fourth = run()
    assert fourth.exit_code() == EXIT_OK and [o.model for o in fourth.outcomes if o.audits] == ["risk"]
    assert run().summary()["runs"] == []                                 # a rerun finds nothing to do

    # every valid request applied exactly once in every model that holds its id, and in no other
    valid = [(r, i) for batch in BATCHES for r, i in batch if i != NOBODY]
    for name, t in by_name.items():
        assert _applied(t) == {r: 1 for r, i in valid if _holds(name, i)}, name
    # the id no model holds: rejected once (later runs find it settled as "not present" everywhere)
    assert verdicts["r1-x"] == ["rejected"] * len(MODELS)
    assert "erased" in verdicts["r2-5"] and "erased" in verdicts["r2-6"]   # the slices' edges

    # each published model against exact retraining of its first version without its ids
    for name, t in by_name.items():
        reg = Registry(t.output)
        latest = reg.latest()
        assert latest.version >= 2
        ids = sorted(i for _, i in valid if _holds(name, i))
        exact = api.retrain_exact(bases[name], delete=ids)
        moved = float((exact - bases[name].final).norm())
        published = reg.open(latest)
        assert int(published.removed_mask().sum()) == len(ids), name
        assert float((published.final - exact).norm()) <= 0.05 * moved, name

    # the receipt: held or not, erased in which version, and which versions still hold it
    receipt = erasure.trace(list(fleet.models), data_id=650)
    rows = {r["model"]: r for r in receipt["models"]}
    assert rows["churn"]["held"] and rows["fraud"]["held"] and rows["ltv"]["held"] and rows["risk"]["held"]
    for name in MODELS:
        assert rows[name]["erased"]["version"] == 1 and rows[name]["latest_holds"] is False
        assert rows[name]["survives_in"] == [0]        # the first version until retention deletes it
    assert not receipt["gone_everywhere"]
    far = {r["model"]: r for r in erasure.trace(list(fleet.models), data_id=1450)["models"]}
    assert far["churn"]["held"] is False and far["ltv"]["held"] is False and far["fraud"]["held"] is True
    by_request = erasure.trace(list(fleet.models), request_id="r3-1", inbox=fleet.requests)
    assert by_request["data_ids"] == [450]


def test_overlapping_runs_submitted_to_a_ray_cluster(ray_cluster, tmp_path):
    """Bulk erasure submitted as Ray jobs (through the CronJob's submitter), each model's erasure a
    task on the cluster: a run that finds the lease held exits 0 with the holder in its result line
    (the lease error crosses the task boundary); two runs submitted at once apply every request
    exactly once between them."""
    import io
    import sys
    from pathlib import Path

    import yaml

    from deltagrad_ray.erasure import Lease
    from deltagrad_ray.jobs.submit import run as submit
    root = Path(__file__).resolve().parents[2]
    dashboard = "http://" + ray_cluster.head_node.address_info["webui_url"]
    write_dataset(synthetic_classification(1500, 8, 3, seed=0), tmp_path / "data.parquet")
    base = api.fit(str(tmp_path / "data.parquet"), str(tmp_path / "models" / "current"), steps=40, lr=0.5, l2=0.01)
    (tmp_path / "requests").mkdir()
    (tmp_path / "requests" / "r.jsonl").write_text(
        "\n".join(json.dumps({"request_id": f"r{i}", "data_id": 3 * i}) for i in range(12)) + "\n")
    cfg = tmp_path / "be.yaml"
    cfg.write_text(yaml.safe_dump({"cache": str(tmp_path / "models" / "current"),
                                   "requests": str(tmp_path / "requests"),
                                   "output": str(tmp_path / "models"), "ray": {"address": "auto", "num_cpus": 1},
                                   "report": str(tmp_path / "reports")}))
    entry = [sys.executable, "-c", "import runpy, sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[1:]; "
             "runpy.run_module('pipelines.bulk_erasure', run_name='__main__')", str(root), "--config", str(cfg)]

    def job(tag: str) -> tuple[int, dict]:
        out = io.StringIO()
        sid = f"bulk-erasure-{tag}-{time.time_ns()}"
        code = submit(dashboard, sid, entry, poll=0.5, out=out)
        (line,) = [x for x in out.getvalue().splitlines() if x.startswith(f"{sid} result: ")]
        return code, json.loads(line.split(" result: ", 1)[1])

    with Lease(tmp_path / "models", LeaseSettings(ttl_s=120, holder="the-other-run")):
        code, line = job("busy")
    assert code == 0 and line["applied"] == 0 and "the-other-run" in line["skipped"], line
    assert line["lease"]["holder"] == "the-other-run"
    results: list = []
    threads = [threading.Thread(target=lambda t=t: results.append(job(t))) for t in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c for c, _ in results] == [0, 0], results
    assert sorted(r["applied"] for _, r in results) == [0, 12]        # one applied them, the other found none
    out = str(tmp_path / "models")
    assert _applied(Target("m", out)) == {f"r{i}": 1 for i in range(12)}
    reg = Registry(out)
    exact = api.retrain_exact(base, delete=[3 * i for i in range(12)])
    assert float((reg.open(reg.latest()).final - exact).norm()) <= 0.05 * float((exact - base.final).norm())
