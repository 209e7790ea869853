"""Hostile and careless input to bulk erasure, one class at a time, several cases each: request
values, request files, identities, a forged ledger, edited or damaged control files (LATEST.json,
version records, plans, results, the lease), settings refused before anything is written, reports.

Every case runs the job as its entry point does (``python -m pipelines.bulk_erasure``, in process)
and checks: the documented exit code, one line naming the problem (no traceback), nothing erased
un-erased (ids erased by version 1 stay removed in every model published after), no valid request
lost (the good request beside a bad one is applied), nothing printed that must not be."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from deltagrad_ray import api
from deltagrad_ray.core import synthetic_classification
from deltagrad_ray.erasure import Ledger, Registry, Runs, bulk_erasure, settlements
from deltagrad_ray.jobs import bulk_erasure as job
from deltagrad_ray.jobs.config import main
from deltagrad_ray.store import write_dataset

ERASED = [1, 2, 3]          # erased by version 1 of the template
GOOD = 10                   # the well-formed request written beside every bad one


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    write_dataset(synthetic_classification(400, 5, 3, seed=0), d / "data.parquet")
    api.fit(str(d / "data.parquet"), str(d / "models" / "current"), model="logreg", steps=25, lr=0.5, l2=0.01)
    (d / "requests").mkdir()
    (d / "requests" / "first.jsonl").write_text(
        "\n".join(json.dumps({"request_id": f"first-{i}", "data_id": i}) for i in ERASED) + "\n")
    bulk_erasure(cache=str(d / "models" / "current"), requests=str(d / "requests"), output=str(d / "models"))
    return d


@pytest.fixture
def w(template, tmp_path):
    shutil.copytree(template, tmp_path / "w")
    return tmp_path / "w"


def _job(w: Path, capsys, **over) -> tuple[int, dict | None, str]:
    cfg = {"requests": str(w / "requests"), "output": str(w / "models"), "verify": {"sample": 0},
           "lease": {"ttl_s": 30}, "report": {"output": str(w / "reports"), "redact_ids": False}}
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    (w / "be.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code = main("bulk erasure", job.SCHEMA, job.run, argv=["--config", str(w / "be.yaml")], options=job.OPTIONS)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    line = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    return code, line, err


def _error(err: str) -> str:
    """The job's one-line error (its last line of standard error)."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from deltagrad_ray.cli import main as cli_main
    capsys.readouterr()
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _still_erased(w: Path) -> None:
    """Every published version after version 0 has the ids version 1 erased removed."""
    reg = Registry(w / "models")
    for rec in reg.lineage():
        if rec.version >= 1:
            ids, removed = reg.open(rec).row_ids()
            assert set(ERASED) <= set(ids[removed].tolist()), f"version {rec.version} holds an erased id"


def _settled(w: Path) -> dict:
    """source → (status, reason), over every settled run of the model (ledger entries it believes)."""
    runs, reg = Runs(w / "models"), Registry(w / "models")
    believed = settlements(Ledger(w / "models"), runs, reg, reg.latest()).runs
    return {r.source: (r.status, r.reason) for run in believed for r in runs.plan(run).requests}


def _with_good(w: Path, name: str, bad: bytes | str) -> None:
    good = json.dumps({"request_id": "good", "data_id": GOOD}) + "\n"
    data = bad if isinstance(bad, bytes) else bad.encode()
    (w / "requests" / name).write_bytes(data + (b"" if data.endswith(b"\n") else b"\n") + good.encode())


# -- class 1: request values (each judged alone; the good request beside it is applied) ---------------------

REQUEST_VALUES = [
    ('{"request_id": "x", "data_id": Infinity}', "rejected", "Infinity is not a JSON number"),
    ('{"request_id": "x", "data_id": -Infinity}', "rejected", "-Infinity is not a JSON number"),
    ('{"request_id": "x", "data_id": NaN}', "rejected", "NaN is not a JSON number"),
    ('{"request_id": "x", "data_id": 1e400}', "rejected", "malformed data_id"),
    ('{"request_id": "x", "data_id": 99999999999999999999999}', "rejected", "beyond int64"),
    ('{"request_id": "x", "data_id": 12.5}', "rejected", "not an integer"),
    ('{"request_id": "x", "data_id": 12.0}', "applied", None),
    ('{"request_id": "x", "data_id": "12"}', "applied", None),
    ('{"request_id": "x", "data_id": " +12 "}', "applied", None),
    ('{"request_id": "x", "data_id": "0x0c"}', "rejected", "not an integer"),
    ('{"request_id": "x", "data_id": "12e0"}', "rejected", "not an integer"),
    ('{"request_id": "x", "data_id": "seven"}', "rejected", "not an integer"),
    ('{"request_id": "x", "data_id": ""}', "rejected", "not an integer"),
    ('{"request_id": "x", "data_id": true}', "rejected", "boolean"),
    ('{"request_id": "x", "data_id": null}', "rejected", "missing data_id"),
    ('{"request_id": "x"}', "rejected", "missing data_id"),
    ('{"request_id": "x", "data_id": [12]}', "rejected", "a list"),
    ('{"request_id": "x", "data_id": {"id": 12}}', "rejected", "a dict"),
    ('{"request_id": "x", "data_id": -12}', "not present", "not in this model's training data"),
    ('{"request_id": "x", "data_id": 1e15}', "not present", "not in this model's training data"),
    ('{"request_id": "x", "data_id": 1e17}', "rejected", "beyond 2^53"),
    ('{"request_id": "x", "data_id": 12, "extra": {"deep": [1, 2]}}', "applied", None),
    ('{"request_id": "x", "data_id": 12, "timestamp": 5}', "applied", None),
    ('{"data_id": 12}', "rejected", "missing request_id"),
    ('{"request_id": "", "data_id": 12}', "rejected", "empty"),
    ('{"request_id": "   ", "data_id": 12}', "rejected", "empty"),
    ('{"request_id": "' + "r" * 300 + '", "data_id": 12}', "rejected", "longer than 256"),
    ('{"request_id": "a\\u0000b", "data_id": 12}', "rejected", "control characters"),
    ('{"request_id": "a\\nb", "data_id": 12}', "rejected", "control characters"),
    ('{"request_id": false, "data_id": 12}', "rejected", "boolean"),
    ('{"request_id": 1.5, "data_id": 12}', "rejected", "a float"),
    ('{"request_id": ["x"], "data_id": 12}', "rejected", "a list"),
    ('{"request_id": 77, "data_id": 12}', "applied", None),
    ('[12]', "rejected", "not a JSON object"),
    ('"x"', "rejected", "not a JSON object"),
    ('12', "rejected", "not a JSON object"),
    ('null', "rejected", "not a JSON object"),
    ('{"request_id": "x", "data_id": ', "rejected", "not JSON"),
    ('{"request_id": "x" "data_id": 12}', "rejected", "not JSON"),
    ("{'request_id': 'x', 'data_id': 12}", "rejected", "not JSON"),
]


@pytest.mark.parametrize("line,status,reason", REQUEST_VALUES, ids=range(len(REQUEST_VALUES)))
def test_request_values_are_judged_alone(w, capsys, line, status, reason):
    _with_good(w, "batch.jsonl", line)
    code, out, err = _job(w, capsys)
    assert code == 0, err
    fate = _settled(w)
    assert fate["batch.jsonl#1"] == ("applied", None)                   # the good request went through
    got, why = fate["batch.jsonl#0"]
    assert got == status and (reason is None or reason in why), (got, why)
    assert _cli(capsys, "erasure", "status", "--output", str(w / "models"), "--requests", str(w / "requests"))[0] == 0
    _still_erased(w)


# -- class 2: request files (forms and encodings read; anything else reported as not read) -------------------

ROW = {"request_id": "f", "data_id": 12}
FILES = [
    ("a.jsonl", json.dumps(ROW).encode(), True),
    ("a.ndjson", json.dumps(ROW).encode(), True),
    ("a.JSONL", json.dumps(ROW).encode(), True),
    ("a.json", json.dumps([ROW]).encode(), True),
    ("a.json", json.dumps(ROW).encode(), True),
    ("a.json", json.dumps({"requests": [ROW]}).encode(), True),
    ("a.jsonl.gz", gzip.compress(json.dumps(ROW).encode()), True),
    ("a.json.gz", gzip.compress(json.dumps([ROW]).encode()), True),
    ("a.jsonl", b"\xef\xbb\xbf" + json.dumps(ROW).encode(), True),                  # UTF-8 with a BOM
    ("a.jsonl", json.dumps(ROW).encode("utf-16"), True),                            # UTF-16 with a BOM
    ("a.jsonl", json.dumps(ROW).encode("utf-32"), True),
    ("a.jsonl", (json.dumps(ROW) + "\r\n\r\n").encode(), True),                     # CRLF, blank lines
    ("nested/deeper/a.jsonl", json.dumps(ROW).encode(), True),
    ("a.csv", b"request_id,data_id\nf,12\n", False),
    ("a.txt", json.dumps(ROW).encode(), False),
    (".a.jsonl", json.dumps(ROW).encode(), False),                                  # hidden
    ("a.jsonl.tmp", json.dumps(ROW).encode(), False),                               # being written
    ("a.jsonl.gz", b"not gzip at all", False),
    ("a.parquet", b"PAR1 garbage", False),
    ("a", json.dumps(ROW).encode(), False),
]


@pytest.mark.parametrize("name,raw,read", FILES, ids=[f"{i}:{f[0]}" for i, f in enumerate(FILES)])
def test_request_files_are_read_or_reported(w, capsys, name, raw, read):
    (w / "requests" / name).parent.mkdir(parents=True, exist_ok=True)
    (w / "requests" / name).write_bytes(raw)
    (w / "requests" / "good.jsonl").write_text(json.dumps({"request_id": "good", "data_id": GOOD}) + "\n")
    code, out, err = _job(w, capsys)
    assert code == 0, err
    applied = {s.split("#")[0] for s, (st, _) in _settled(w).items() if st == "applied"}
    assert "good.jsonl" in applied
    assert (name in applied) == read
    assert (name in out["not_read"]) == (not read), out["not_read"]


def test_a_binary_line_is_rejected_and_the_rest_of_the_file_is_read(w, capsys):
    _with_good(w, "batch.jsonl", b"\x80\x81garbage\n" + json.dumps(ROW).encode())
    assert _job(w, capsys)[0] == 0
    fate = _settled(w)
    assert fate["batch.jsonl#0"][0] == "rejected" and "not UTF-8" in fate["batch.jsonl#0"][1]
    assert fate["batch.jsonl#1"] == ("applied", None) and fate["batch.jsonl#2"] == ("applied", None)


# -- class 3: identity (request_id, data_id) ---------------------------------------------------------------

def test_a_request_id_reused_with_another_data_id_is_another_request(w, capsys):
    (w / "requests" / "later.jsonl").write_text(json.dumps({"request_id": "first-1", "data_id": 20}) + "\n")
    assert _job(w, capsys)[0] == 0
    assert _settled(w)["later.jsonl#0"] == ("applied", None)


def test_the_same_request_again_is_a_duplicate_with_its_first_run_named(w, capsys):
    (w / "requests" / "later.jsonl").write_text(json.dumps({"request_id": "first-1", "data_id": 1}) + "\n")
    assert _job(w, capsys)[0] == 0
    status, why = _settled(w)["later.jsonl#0"]
    assert status == "duplicate" and "settled before by run" in why


def test_another_request_for_an_erased_id_is_settled_as_already_erased(w, capsys):
    (w / "requests" / "later.jsonl").write_text(json.dumps({"request_id": "other", "data_id": 2}) + "\n")
    assert _job(w, capsys)[0] == 0
    status, why = _settled(w)["later.jsonl#0"]
    assert status == "already erased" and "erased in an earlier version" in why


def test_a_rewritten_request_file_is_read_again(w, capsys):
    (w / "requests" / "first.jsonl").write_text(json.dumps({"request_id": "new", "data_id": 30}) + "\n")
    assert _job(w, capsys)[0] == 0
    assert _settled(w)["first.jsonl#0"] == ("applied", None)


# -- class 4: the ledger cannot be forged ------------------------------------------------------------------

def _forge(where: Path, run_id: str, body: bytes) -> None:
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{run_id}.json").write_bytes(body)


FORGED = [
    ("models/ledger", "20260101T000000Z-abcdef", json.dumps({"requests": [{"request_id": "victim", "data_id": 20,
                                                                          "status": "applied"}]}).encode()),
    ("models/ledger", "../escape", b"{}"),
    ("models/ledger", "not-a-run", b"garbage"),
    ("requests/_done", "20260101T000000Z-abcdef", json.dumps({"requests": [{"request_id": "victim", "data_id": 20,
                                                                           "status": "applied"}]}).encode()),
    ("requests/_done", "victim", b"{}"),
]


@pytest.mark.parametrize("where,run_id,body", FORGED, ids=range(len(FORGED)))
def test_a_forged_ledger_entry_settles_nothing(w, capsys, where, run_id, body):
    (w / "requests" / "victim.jsonl").write_text(json.dumps({"request_id": "victim", "data_id": 20}) + "\n")
    _forge(w / where, run_id.replace("../", ""), body)
    code, out, err = _job(w, capsys)
    assert code == 0 and out["applied"] == 1, err
    assert _settled(w)["victim.jsonl#0"] == ("applied", None)


def test_a_ledger_entry_of_a_plan_that_never_published_is_not_believed(w, capsys, monkeypatch):
    (w / "requests" / "victim.jsonl").write_text(json.dumps({"request_id": "victim", "data_id": 20}) + "\n")

    def die(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(Registry, "publish", die)
    assert _job(w, capsys)[0] == 130                                     # killed before publishing
    monkeypatch.undo()
    open_run = [r for r in Runs(w / "models").plan_ids() if not (w / "models" / "ledger" / f"{r}.json").exists()]
    (run,) = open_run
    _forge(w / "models" / "ledger", run, b"{}")                          # a marker for it, forged
    (st,) = __import__("deltagrad_ray.erasure", fromlist=["status"]).status(
        __import__("deltagrad_ray.erasure", fromlist=["Target"]).Target("m", str(w / "models")), str(w / "requests"))
    assert any(e["run_id"] == run for e in st["ignored_ledger_entries"])
    code, out, err = _job(w, capsys)
    assert code == 0 and out["applied"] == 1
    _still_erased(w)


# -- class 5: LATEST.json and the version records are verified on read ---------------------------------------

def _latest(w: Path) -> dict:
    return json.loads((w / "models" / "LATEST.json").read_text())


def _edit_latest(w: Path, **changes) -> None:
    rec = _latest(w)
    rec.update(changes)
    (w / "models" / "LATEST.json").write_text(json.dumps(rec))


LATEST_EDITS = [
    ("key back to version 0", lambda w: _edit_latest(w, key="current", version=0), "LATEST.json"),
    ("key only", lambda w: _edit_latest(w, key="current"), "LATEST.json"),
    ("model sha256", lambda w: _edit_latest(w, model_sha256="sha256:" + "0" * 64), "LATEST.json"),
    ("version ahead", lambda w: _edit_latest(w, version=7), "LATEST.json"),
    ("key outside the prefix", lambda w: _edit_latest(w, key="../elsewhere"), "LATEST.json"),
    ("absolute key", lambda w: _edit_latest(w, key="/etc"), "LATEST.json"),
    ("stored URI with storage settings", lambda w: _edit_latest(
        w, key=None, cache="s3://b/m?endpoint_override=evil.example:80&scheme=http"), "LATEST.json"),
    ("truncated", lambda w: (w / "models" / "LATEST.json").write_bytes(
        (w / "models" / "LATEST.json").read_bytes()[:20]), "LATEST.json"),
    ("garbage", lambda w: (w / "models" / "LATEST.json").write_bytes(b"\x00\xff garbage"), "LATEST.json"),
    ("a list", lambda w: (w / "models" / "LATEST.json").write_text("[1, 2]"), "LATEST.json"),
    ("NaN inside", lambda w: (w / "models" / "LATEST.json").write_text(
        (w / "models" / "LATEST.json").read_text().replace('"version": 1', '"version": NaN')), "LATEST.json"),
    ("deleted", lambda w: (w / "models" / "LATEST.json").unlink(), "LATEST.json"),
    ("version record edited", lambda w: (w / "models" / "versions" / "0001.json").write_text(
        (w / "models" / "versions" / "0001.json").read_text().replace('"applied": 3', '"applied": 0')), "0001.json"),
    ("version record truncated", lambda w: (w / "models" / "versions" / "0001.json").write_bytes(b'{"vers'),
     "0001.json"),
    ("first version record edited", lambda w: (w / "models" / "versions" / "0000.json").write_text(
        (w / "models" / "versions" / "0000.json").read_text().replace('"version": 0', '"version": 0, "x": 1')),
     "0000.json"),
]


@pytest.mark.parametrize("what,edit,names", LATEST_EDITS, ids=[e[0] for e in LATEST_EDITS])
def test_an_edited_or_damaged_pointer_or_record_stops_with_exit_3_and_the_repair(w, template, capsys, what, edit,
                                                                                 names):
    (w / "requests" / "more.jsonl").write_text(json.dumps({"request_id": "m", "data_id": GOOD}) + "\n")
    edit(w)
    code, out, err = _job(w, capsys)
    assert code == 3, err
    msg = _error(err)
    assert names in msg and "evil.example" not in msg
    # the downstream commands that read the published model refuse too (never the erased rows)
    (w / "ids.txt").write_text("5\n")
    code, _, err = _cli(capsys, "retrain", "--cache", str(w / "models"), "--delete", str(w / "ids.txt"),
                        "--out", str(w / "retrained"))
    assert code in (2, 3) and "Traceback" not in err
    # a pointer can be repaired from the lineage; a damaged record needs its backup
    if names == "LATEST.json":
        assert "erasure repair --output" in msg
        code, out, err = _cli(capsys, "erasure", "repair", "--output", str(w / "models"))
        assert code == 0, err
    else:                              # the lineage itself: only a backup brings it back
        assert "backup" in msg
        shutil.copy(template / "models" / "versions" / names, w / "models" / "versions" / names)
    code, out, err = _job(w, capsys)
    assert code == 0 and out["applied"] == 1, err
    _still_erased(w)


def test_a_cache_whose_model_was_replaced_is_refused(w, capsys):
    (w / "requests" / "more.jsonl").write_text(json.dumps({"request_id": "m", "data_id": GOOD}) + "\n")
    rec = _latest(w)
    cache = w / "models" / rec["key"]
    other = w / "models" / "current" / "model.safetensors"
    shutil.copy(other, cache / "model.safetensors")
    code, out, err = _job(w, capsys)
    assert code == 3 and ("model" in _error(err))
    _still_erased(w)


# -- class 6: damaged control files ------------------------------------------------------------------------

def _open_plan(w: Path, capsys, monkeypatch) -> str:
    """A run killed after its result: its plan and result exist, nothing published."""
    (w / "requests" / "more.jsonl").write_text(json.dumps({"request_id": "m", "data_id": GOOD}) + "\n")

    def die(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(Registry, "publish", die)
    assert _job(w, capsys)[0] == 130
    monkeypatch.undo()
    (run,) = [r for r in Runs(w / "models").plan_ids() if not (w / "models" / "ledger" / f"{r}.json").exists()]
    return run


DAMAGE = [
    ("plan", lambda w, run: w / "models" / "plans" / f"{run}.json", b'{"run_id": '),
    ("plan wrong shape", lambda w, run: w / "models" / "plans" / f"{run}.json", b"[]"),
    ("result", lambda w, run: w / "models" / "runs" / run / "result.json", b"\x00\x01"),
    ("result wrong shape", lambda w, run: w / "models" / "runs" / run / "result.json",
     b'{"new_version": "two"}'),
    ("lease", lambda w, run: w / "models" / "_lease.json", b'{"holder": '),
    ("lease wrong shape", lambda w, run: w / "models" / "_lease.json", b'{"holder": 5}'),
]


@pytest.mark.parametrize("what,path,raw", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_control_file_is_a_storage_error_naming_it(w, capsys, monkeypatch, what, path, raw):
    run = _open_plan(w, capsys, monkeypatch)
    target = path(w, run)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(raw)
    code, out, err = _job(w, capsys)
    assert code == 3, err
    assert target.name in _error(err)
    _still_erased(w)
    code, out, err = _cli(capsys, "erasure", "status", "--output", str(w / "models"))
    if what.startswith("result"):     # status does not read results: it lists the open plan
        assert code == 0 and run in out
    else:
        assert code == 3 and target.name in _error(err)


# -- class 7: settings are checked before anything is written ---------------------------------------------

BAD_SETTINGS = [
    ({"verify": {"tolerance": float("nan")}}, "verify.tolerance"),
    ({"verify": {"tolerance": float("inf")}}, "verify.tolerance"),
    ({"verify": {"tolerance": -0.1}}, "verify.tolerance"),
    ({"verify": {"tolerance": "0.05"}}, "verify.tolerance"),
    ({"verify": {"sample": 1.5}}, "verify.sample"),
    ({"verify": {"sample": -0.1}}, "verify.sample"),
    ({"verify": {"sample": float("nan")}}, "verify.sample"),
    ({"verify": {"samples": 1}}, "samples"),
    ({"lease": {"ttl_s": 0}}, "ttl_s"),
    ({"lease": {"ttl_s": float("nan")}}, "ttl_s"),
    ({"lease": {"wait_s": -1}}, "wait_s"),
    ({"lease": {"wait_s": float("inf")}}, "wait_s"),
    ({"retention": {"superseded_days": float("nan")}}, "superseded_days"),
    ({"retention": {"superseded_days": -1}}, "superseded_days"),
    ({"retention": {"keep": 3}}, "keep"),
    ({"ray": {"workers": 0}}, "workers"),
    ({"reconcile": {"max_drift": float("nan")}}, "reconcile.max_drift"),
    ({"reconcile": {"max_drift": 0}}, "reconcile.max_drift"),
    ({"reconcile": {"every_versions": 0}}, "every_versions"),
    ({"reconcile": {"every_versions": 2.5}}, "every_versions"),
    ({"deltagrad": {"period": 0}}, "period"),
    ({"deltagrad": {"perod": 5}}, "perod"),
    ({"models": [{"name": "a", "output": "x"}]}, "not both"),
    ({"name": "  "}, "name"),
]


@pytest.mark.parametrize("over,word", BAD_SETTINGS, ids=range(len(BAD_SETTINGS)))
def test_bad_settings_are_refused_before_anything_is_written(w, capsys, over, word):
    (w / "requests" / "more.jsonl").write_text(json.dumps({"request_id": "m", "data_id": GOOD}) + "\n")
    before = sorted(p.relative_to(w) for p in (w / "models").rglob("*"))
    latest = (w / "models" / "LATEST.json").read_bytes()
    code, out, err = _job(w, capsys, **over)
    assert code == 2 and word in _error(err), err
    assert sorted(p.relative_to(w) for p in (w / "models").rglob("*")) == before
    assert (w / "models" / "LATEST.json").read_bytes() == latest


# -- class 8: reports escape what users wrote, redaction covers every id ------------------------------------

HOSTILE_IDS = ["a|b", "<script>alert(1)</script>", "`code`", "[link](http://x)", "**bold**", "# heading", "x\\|y"]


@pytest.mark.parametrize("rid", HOSTILE_IDS, ids=range(len(HOSTILE_IDS)))
def test_report_cells_are_escaped(w, capsys, rid):
    (w / "requests" / "r.jsonl").write_text(json.dumps({"request_id": rid, "data_id": GOOD}) + "\n")
    code, out, err = _job(w, capsys)
    assert code == 0
    from deltagrad_ray.report import md
    report = Path(out["report"]).read_text()
    assert f"| {md(rid)} |" in report and "<script>" not in report
    for line in report.splitlines():          # every table row keeps its columns
        if line.startswith("| ") and "request_id" not in line and "---" not in line:
            cells = line.replace("\\|", "").count("|")
            assert cells in {3, 7, 9}, line


def test_redacted_reports_show_no_data_id_anywhere(w, capsys):
    rows = [{"request_id": "r1", "data_id": 271}, {"request_id": "r2", "data_id": 987654},
            {"request_id": "r3", "data_id": "31415x"}, {"request_id": "r4", "data_id": 12.5}]
    (w / "requests" / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, out, err = _job(w, capsys, report={"redact_ids": True})
    assert code == 0
    report = Path(out["report"]).read_text()
    # not as a number of its own anywhere (a clock stamp such as 20261206T212714Z, 0.271 s, or a run id
    # or salted hash in hex, holds "271" by chance: the stamp line is dropped, and a match must not
    # touch other digits or hex letters)
    body = "\n".join(line for line in report.splitlines() if not line.startswith("_generated "))
    for secret in ("271", "987654", "31415", "12.5"):
        assert re.search(rf"(?<![0-9a-f.]){re.escape(secret)}(?![0-9a-f]|\.[0-9])", body) is None, secret
    assert "r2" in report and "h:" in report


# -- the same classes on S3 (the moto server over HTTP) -----------------------------------------------------

def test_hostile_cases_on_s3(template, tmp_path, moto_s3, capsys, monkeypatch):
    """A hostile value, a gzip request file, a forged ledger entry, an edited and a truncated
    LATEST.json and a stored URI carrying storage settings — on S3, with the same outcomes."""
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_s3.secret_key)
    bucket = moto_s3.make_bucket("dg-hostile")
    client = moto_s3.client()
    for p in template.rglob("*"):
        if p.is_file():
            client.put_object(Bucket=bucket, Key=f"w/{p.relative_to(template)}", Body=p.read_bytes())
    query = f"endpoint_override={moto_s3.endpoint.split('://', 1)[1]}&scheme=http"
    models, requests = f"s3://{bucket}/w/models?{query}", f"s3://{bucket}/w/requests?{query}"

    def run() -> tuple[int, dict | None, str]:
        (tmp_path / "be.yaml").write_text(yaml.safe_dump({"requests": requests, "output": models,
                                                          "lease": {"ttl_s": 30}}))
        capsys.readouterr()
        code = main("bulk erasure", job.SCHEMA, job.run, argv=["--config", str(tmp_path / "be.yaml")])
        out, err = capsys.readouterr()
        assert "Traceback" not in err and moto_s3.secret_key not in out + err
        return code, (json.loads(out.strip().splitlines()[-1]) if out.strip() else None), err

    def put(key: str, body: bytes) -> None:
        client.put_object(Bucket=bucket, Key=f"w/{key}", Body=body)

    def get(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"w/{key}")["Body"].read()

    put("requests/bad.jsonl", b'{"request_id": "inf", "data_id": Infinity}\n{"request_id": "ok", "data_id": 10}\n')
    put("requests/more.jsonl.gz", gzip.compress(b'{"request_id": "gz", "data_id": 11}\n'))
    put("models/ledger/20260101T000000Z-abcdef.json", b'{"requests": [{"request_id": "ok", "data_id": 10}]}')
    code, out, err = run()
    assert code == 0 and out["applied"] == 2 and out["not_read"] == [], err       # ok and gz; inf rejected
    latest = get("models/LATEST.json")
    edits = [json.loads(latest) | {"key": "current"}, json.loads(latest) | {
        "key": None, "cache": "s3://other/m?endpoint_override=evil.example:80&scheme=http"}]
    for body in [json.dumps(e).encode() for e in edits] + [latest[:25]]:
        put("models/LATEST.json", body)
        put("requests/next.jsonl", json.dumps({"request_id": f"n{len(body)}", "data_id": 12}).encode() + b"\n")
        code, out, err = run()
        assert code == 3 and "LATEST.json" in _error(err) and "evil.example" not in err, err
        put("models/LATEST.json", latest)
    code, out, err = run()
    assert code == 0 and out["applied"] == 1
    reg = Registry(models)
    ids, removed = reg.open(reg.latest()).row_ids()
    assert {1, 2, 3, 10, 11, 12} <= set(ids[removed].tolist())
