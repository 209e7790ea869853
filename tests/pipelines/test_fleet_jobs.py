"""Fleet erasure as users configure it: two single-model jobs fed from one inbox, a model published
under a new output with the same inbox, a fleet config with a failing model, retention and the
receipt, the erasure package's import graph. Published models are compared with exact retraining."""

from __future__ import annotations

import ast
import datetime as dt
import json
from pathlib import Path

import pytest
import torch

from deltagrad_ray import api, erasure
from deltagrad_ray.core import InputError, synthetic_classification
from deltagrad_ray.erasure import Ledger, Registry, Runs, Target
from deltagrad_ray.jobs import bulk_erasure as job
from deltagrad_ray.jobs.config import PartialRun, check
from deltagrad_ray.store import write_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """One user table of 3,000 rows and two models: A on rows 0–1999, B on rows 1000–2999."""
    d = tmp_path_factory.mktemp("fleet")
    data = synthetic_classification(3000, 8, 3, seed=0)
    caches = {}
    for name, (lo, hi) in {"a": (0, 2000), "b": (1000, 3000)}.items():
        write_dataset(data.rows(torch.arange(lo, hi)), d / f"{name}.parquet")
        caches[name] = api.fit(str(d / f"{name}.parquet"), str(d / "first" / name), model="logreg", steps=40,
                               lr=0.5, l2=0.01)
    return d, caches


def _copy_cache(src, dst: Path):
    import shutil
    shutil.copytree(src.root.path, dst)
    return str(dst)


def _inbox(path: Path, ids: list[int]) -> list[tuple[str, int]]:
    path.mkdir(parents=True, exist_ok=True)
    rows = [(f"req-{i}", i) for i in ids]
    (path / "batch.jsonl").write_text("\n".join(json.dumps({"request_id": r, "data_id": i}) for r, i in rows) + "\n")
    return rows


def _close_to_exact(base, output, ids):
    reg = Registry(output)
    published = reg.open(reg.latest())
    exact = api.retrain_exact(base, delete=sorted(ids))
    moved = float((exact - base.final).norm())
    assert moved > 0 and float((published.final - exact).norm()) <= 0.05 * moved
    assert int(published.removed_mask().sum()) == len(ids)


def _applied(output) -> set[str]:
    runs = Runs(output)
    return {r.request_id for run in Ledger(output).entries() for r in runs.plan(run).requests if r.status == "applied"}


def test_two_single_model_jobs_sharing_an_inbox_each_erase_all_their_own_ids(table, tmp_path):
    """The configuration of the issue: each model's job configured the natural way (its own cache
    and output, the same requests). Before ledgers were per output, the second job erased 0/16."""
    d, caches = table
    ids = [5, 300, 999, 1000, 1500, 1999, 2000, 2500, 2999, 120, 1100, 1800, 2100, 2222, 640, 1234]
    rows = _inbox(tmp_path / "requests", ids)
    outs = {}
    for name, (lo, hi) in {"a": (0, 2000), "b": (1000, 3000)}.items():
        outs[name] = tmp_path / "models" / name
        cfg = check({"cache": _copy_cache(caches[name], tmp_path / "first" / name),
                     "requests": str(tmp_path / "requests"),
                     "output": str(outs[name]), "verify": {"sample": 0}}, job.SCHEMA)
        out = job.run(cfg)
        mine = {r for r, i in rows if lo <= i < hi}
        # the ids of the other model's rows: "not present" in this one, and no model of this job's
        # fleet (of one) holds them, so the job reports them rejected — for this model only
        assert out["applied"] == len(mine) and out["rejected"] == len(rows) - len(mine), out
        assert _applied(outs[name]) == mine
        _close_to_exact(caches[name], outs[name], [i for _, i in rows if lo <= i < hi])
    # each job again: nothing pends for either
    for name in ("a", "b"):
        cfg = check({"requests": str(tmp_path / "requests"), "output": str(outs[name])}, job.SCHEMA)
        assert job.run(cfg)["runs"] == []


def test_a_model_published_under_a_new_output_applies_every_earlier_erasure(table, tmp_path):
    """Ledgers belong to outputs: the first version published under a new prefix, fed by the same
    inbox, owes every request it holds — it never inherits another output's settlements."""
    d, caches = table
    rows = _inbox(tmp_path / "requests", [7, 70, 700])
    first = tmp_path / "models-2025"
    job.run(check({"cache": _copy_cache(caches["a"], tmp_path / "c1"), "requests": str(tmp_path / "requests"),
                   "output": str(first)}, job.SCHEMA))
    assert _applied(first) == {r for r, _ in rows}
    moved = tmp_path / "models-2026"                      # the same first cache, published anew
    out = job.run(check({"cache": _copy_cache(caches["a"], tmp_path / "c2"), "requests": str(tmp_path / "requests"),
                         "output": str(moved)}, job.SCHEMA))
    assert out["applied"] == 3 and _applied(moved) == {r for r, _ in rows}
    _close_to_exact(caches["a"], moved, [7, 70, 700])


def test_a_fleet_config_reports_a_failing_model_and_finishes_the_others(table, tmp_path, capsys):
    d, caches = table
    _inbox(tmp_path / "requests", [10, 1500, 2900, 10 ** 6])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    cfg = check({"requests": str(tmp_path / "requests"), "verify": {"sample": 0},
                 "report": {"output": str(tmp_path / "reports"), "redact_ids": False},
                 "ray": {"workers": 1},
                 "models": [{"name": "a", "output": str(tmp_path / "out" / "a"),
                             "cache": _copy_cache(caches["a"], tmp_path / "ca")},
                            {"name": "broken", "output": str(tmp_path / "out" / "broken"),
                             "cache": str(tmp_path / "broken")},
                            {"name": "b", "output": str(tmp_path / "out" / "b"),
                             "cache": _copy_cache(caches["b"], tmp_path / "cb")}]}, job.SCHEMA)
    with pytest.raises(PartialRun) as e:
        job.run(cfg)
    out = e.value.summary
    assert out["failed"].keys() == {"broken"} and "manifest.json" in out["failed"]["broken"]
    assert out["published"] == {"a": 1, "b": 1}
    assert _applied(tmp_path / "out" / "a") == {"req-10", "req-1500"}
    assert _applied(tmp_path / "out" / "b") == {"req-1500", "req-2900"}
    # the id of no model that could be read is not rejected while a model failed: it pends
    report = next((tmp_path / "reports").rglob("report.md")).read_text()
    assert "| req-1000000 |" in report and "pending" in report
    # status and the receipt cover the failed model
    targets = job.fleet_of(cfg).models
    st = {s["model"]: s for s in erasure.status(targets, str(tmp_path / "requests"))}
    assert st["broken"]["last_failure"]["kind"] == "storage" and st["broken"]["published"] is None
    assert "manifest.json" in st["broken"]["last_failure"]["message"]
    assert st["a"]["pending"] == 0 and st["a"]["published"]["version"] == 1
    rec = {r["model"]: r for r in erasure.trace(targets, data_id=1500)["models"]}
    assert rec["a"]["erased"]["version"] == 1 and rec["b"]["erased"]["version"] == 1
    assert "error" in rec["broken"] or rec["broken"].get("held") is None


def test_retention_deletes_superseded_caches_and_the_receipt_says_until_when(table, tmp_path):
    d, caches = table
    base = caches["a"]
    out = tmp_path / "models"
    _inbox(tmp_path / "requests", [3, 33])
    cfg = {"cache": _copy_cache(base, out / "current"), "requests": str(tmp_path / "requests"),
           "output": str(out), "retention": {"superseded_days": 30}}
    job.run(check(cfg, job.SCHEMA))
    target = Target("a", str(out))
    receipt = erasure.trace([target], data_id=33, retention=erasure.RetentionSettings(30))["models"][0]
    assert receipt["erased"]["version"] == 1 and receipt["survives_in"] == [0]
    until = dt.datetime.fromisoformat(receipt["versions"][1]["until"])
    assert dt.timedelta(days=29) < until - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(days=30)
    assert (out / "current" / "manifest.json").exists()            # kept for 30 days
    # past the retention: the superseded cache goes, recorded, and the receipt says the id is gone
    res = erasure.prune(out, erasure.RetentionSettings(30), at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=31))
    assert [x["version"] for x in res["deleted"]] == [0]
    assert not [p for p in (out / "current").rglob("*") if p.is_file()]
    receipt = erasure.trace([target], data_id=33)
    assert receipt["gone_everywhere"] and receipt["models"][0]["survives_in"] == []
    assert "cache deleted" in receipt["models"][0]["versions"][1]["state"]
    assert any(json.loads(f.read_text())["outcome"] == "pruned" for f in (out / "audit").glob("*-prune.json"))
    # the model still works after its first version is gone: the next run erases on top of version 1
    _inbox(tmp_path / "requests2", [44])
    cfg2 = {**cfg, "requests": str(tmp_path / "requests2"), "cache": None}
    assert job.run(check(cfg2, job.SCHEMA))["published"]["version"] == 2
    _close_to_exact(base, out, [3, 33, 44])


def test_bad_fleet_configs_are_refused_before_anything_is_written(tmp_path):
    base = {"requests": str(tmp_path / "requests")}
    bad = [
        ({"models": [{"name": "a", "output": str(tmp_path / "o")}], "output": str(tmp_path / "o")}, "not both"),
        ({"models": []}, "non-empty list"),
        ({"models": [{"name": "a", "output": str(tmp_path / "o")}, {"name": "a", "output": str(tmp_path / "p")}]},
         "used twice"),
        ({"models": [{"name": "a", "output": str(tmp_path / "o")}, {"name": "b", "output": str(tmp_path / "o/b")}]},
         "overlapping outputs"),
        ({"models": [{"name": "a", "output": str(tmp_path / "requests" / "m")}]}, "overlap"),
        ({"output": str(tmp_path / "o"), "verify": {"sample": 2}}, "verify.sample must be a finite number"),
        ({"output": str(tmp_path / "o"), "verify": {"tolerance": float("nan")}}, "verify.tolerance"),
        ({"output": str(tmp_path / "o"), "retention": {"superseded_days": -1}}, "superseded_days"),
        ({"output": str(tmp_path / "o"), "lease": {"ttl_s": float("inf")}}, "ttl_s"),
        ({"models": [{"name": "a", "output": str(tmp_path / "o"), "ray": {"num_gpus": -1}}]}, "num_gpus"),
    ]
    for extra, message in bad:
        with pytest.raises(InputError, match=message):
            job.fleet_of(check({**base, **extra}, job.SCHEMA))
    assert not any(tmp_path.iterdir())


def _imports(path: Path) -> set[str]:
    """The erasure package's modules that ``path`` imports (at any depth: function-level too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update(a.name for a in node.names)
    return out


def test_the_erasure_package_has_no_import_cycle():
    pkg = ROOT / "deltagrad_ray" / "erasure"
    modules = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    graph = {m: _imports(pkg / f"{m}.py") & modules for m in modules}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2
    for m in sorted(modules):
        if m not in state:
            visit(m, [])
    # the storage layer never imports erasure (the registry is a storage format)
    for f in (ROOT / "deltagrad_ray" / "store").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any("erasure" in n for n in names), f"store/{f.name} imports {names}"
