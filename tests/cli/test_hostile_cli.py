"""Hostile and careless input on the command line (issue 22), run as a user runs the command: a
separate process, its exit code and its stderr.

* no secret given in a location or an endpoint is ever printed, whatever the command (exit 2);
* every numeric flag is checked: a one-line error naming the flag and its range (exit 2);
* an --address where no Ray cluster answers fails within --connect-timeout (exit 3);
* `loo`'s result parts are named by position: an interrupted run resumes without collisions, and
  a damaged part names itself (exit 3);
* errors raised inside Ray actors reach the user as in process: one line, the same exit code.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from deltagrad_ray import api
from deltagrad_ray.core import Dataset, synthetic_classification
from deltagrad_ray.results import read_table
from deltagrad_ray.store import write_dataset

SECRET = "Zq9SECRETv7"


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "DELTAGRAD_NO_PROGRESS": "1", **extra}


def cli(*args: str, cwd, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltagrad_ray.cli", *args], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _one_line(p: subprocess.CompletedProcess, code: int) -> str:
    assert p.returncode == code, (p.returncode, p.stderr[-3000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    data = synthetic_classification(400, 6, 3, seed=0)
    write_dataset(data, d / "data.parquet")
    api.fit(str(d / "data.parquet"), str(d / "c1"), model="logreg", steps=30, lr=0.3, l2=0.01, shard_steps=10)
    (d / "ids.txt").write_text("\n".join(str(int(i)) for i in data.ids[:10]))
    return d, data


# -- 1. credentials -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, env", [
    (["loo", "--cache", f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs/c1", "--out", "o.parquet"], {}),
    (["train", "--data", f"s3://bucket/data?access_key=AK&secret_key={SECRET}", "--model", "logreg", "--steps", "3",
      "--lr", "0.1", "--cache", "cx"], {}),
    (["unlearn", "--cache", "c1", "--delete", f"s3://bucket/ids.txt?session_token={SECRET}", "--out", "u.st"], {}),
    (["evaluate", "--model", f"AKIAEXAMPLE:{SECRET}@bucket/m.safetensors", "--data", "data.parquet"], {}),
    (["make-data", "--kind", "iris", "--out", f"file://user:{SECRET}@localhost/tmp/x.parquet"], {}),
    (["--endpoint-url", f"http://AKIAEXAMPLE:{SECRET}@127.0.0.1:9000", "loo", "--cache", "s3://bucket/c",
      "--out", "o.parquet"], {}),
    (["loo", "--cache", "s3://bucket/c", "--out", "o.parquet"],
     {"AWS_ENDPOINT_URL": f"http://AKIAEXAMPLE:{SECRET}@127.0.0.1:9000"}),
    (["jackknife", "--cache", "c1", "--test", f"s3://{SECRET}@bucket/test", "--out", "j.parquet"], {}),
])
def test_no_command_prints_a_secret_given_in_a_location(world, args, env):
    d, _ = world
    p = cli(*args, cwd=d, env=_env(**env))
    line = _one_line(p, 2)
    assert SECRET not in p.stdout + p.stderr
    assert "credentials in a" in line or "unsupported location" in line, line


# -- 4. numeric flags -----------------------------------------------------------------------------
TRAIN = ["train", "--data", "data.parquet", "--model", "logreg", "--cache", "cx"]
LOO = ["loo", "--cache", "c1", "--out", "o.parquet"]
NUMERIC = [
    (TRAIN + ["--lr", "0.1"], "--steps", "0", "an integer >= 1"),
    (TRAIN + ["--lr", "0.1"], "--steps", "2.5", "an integer >= 1"),
    (TRAIN + ["--steps", "5"], "--lr", "0", "a finite number > 0"),
    (TRAIN + ["--steps", "5"], "--lr", "nan", "a finite number > 0"),
    (TRAIN + ["--steps", "5"], "--lr", "inf", "a finite number > 0"),
    (TRAIN + ["--steps", "5"], "--lr", "1e999", "a finite number > 0"),
    (TRAIN + ["--steps", "5", "--lr", "0.1"], "--l2", "-1", "a finite number >= 0"),
    (TRAIN + ["--steps", "5", "--lr", "0.1"], "--l2", "inf", "a finite number >= 0"),
    (TRAIN + ["--steps", "5", "--lr", "0.1"], "--lr-gamma", "0", "a finite number > 0"),
    (TRAIN + ["--steps", "5", "--lr", "0.1"], "--batch-size", "0", "an integer >= 1"),
    (TRAIN + ["--steps", "5", "--lr", "0.1"], "--seed", "-1", "an integer in [0, 9223372036854775807]"),
    (TRAIN + ["--steps", "5", "--lr", "0.1"], "--classes", "1", "an integer >= 2"),
    (TRAIN + ["--steps", "5", "--lr", "0.1"], "--shard-steps", "0", "an integer >= 1"),
    (TRAIN + ["--steps", "5", "--lr", "0.1"], "--shard-mb", "0", "a finite number > 0"),
    (TRAIN + ["--steps", "5", "--lr", "0.1"], "--hidden", "8,0", "comma-separated integers >= 1"),
    (TRAIN + ["--steps", "5", "--lr", "0.1"], "--lr-milestones", "-3", "comma-separated integers >= 1"),
    (LOO, "--batch-size", "0", "an integer >= 1"),
    (LOO, "--workers", "0", "an integer >= 1"),
    (LOO, "--num-cpus", "0", "a finite number > 0"),
    (LOO, "--num-cpus", "-1", "a finite number > 0"),
    (LOO, "--num-gpus", "-0.5", "a finite number >= 0"),
    (LOO, "--num-gpus", "nan", "a finite number >= 0"),
    (LOO, "--num-gpus", "inf", "a finite number >= 0"),
    (LOO, "--max-model-mb", "-1", "a finite number >= 0"),
    (LOO, "--max-model-mb", "nan", "a finite number >= 0"),
    (LOO, "--connect-timeout", "0", "a finite number > 0"),
    (LOO, "--data-shards", "-1", "'auto' or a count >= 0"),
    (LOO, "--period", "0", "an integer >= 1"),
    (LOO, "--burn-in", "-1", "an integer >= 0"),
    (LOO, "--history", "0", "an integer >= 1"),
    (LOO, "--curvature-guard", "0.5", "a finite number >= 1"),
    (LOO, "--max-curvature", "0", "a finite number > 0"),
    (LOO, "--growth", "nan", "a finite number >= 1"),
    (LOO, "--adaptive-tol", "-inf", "a finite number > 0"),
    (LOO, "--path-pairs", "0", "an integer >= 1"),
    (["jackknife", "--cache", "c1", "--test", "data.parquet", "--out", "j.parquet"], "--memory-mb", "0",
     "a finite number > 0"),
    (["conformal", "--cache", "c1", "--test", "data.parquet", "--out", "k.parquet"], "--alpha", "1",
     "a finite number in (0, 1)"),
    (["conformal", "--cache", "c1", "--test", "data.parquet", "--out", "k.parquet"], "--alpha", "nan",
     "a finite number in (0, 1)"),
    (["conformal", "--cache", "c1", "--test", "data.parquet", "--out", "k.parquet"], "--folds", "1",
     "an integer >= 2"),
    (["make-data", "--kind", "classification", "--out", "m.parquet"], "--n", "0", "an integer >= 1"),
    (["make-data", "--kind", "classification", "--out", "m.parquet"], "--seed", str(2**64), "an integer in [0"),
    (["demo"], "--steps", "0", "an integer >= 1"),
    (["erasure", "abandon", "run-1", "--output", "models"], "--wait", "nan", "a finite number >= 0"),
]


@pytest.mark.parametrize("args, flag, value, allowed", NUMERIC)
def test_every_numeric_flag_is_checked_naming_the_flag_and_its_range(args, flag, value, allowed, capsys):
    """In process (one parse each, every flag); the subprocess test below checks the exit as a user sees it."""
    from deltagrad_ray.cli import main
    with pytest.raises(SystemExit) as e:
        main([*args, f"{flag}={value}"])  # "--flag=-inf": as a shell user writes a value that starts with '-'
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and (err[0].startswith(f"error: argument {flag}: must be {allowed}")
                              or err[0].startswith(f"error: argument {flag}: expected {allowed}")), err
    assert repr(value) in err[0] and "--help" in err[0], err


@pytest.mark.parametrize("args", [
    LOO + ["--backend", "ray", "--num-cpus", "0"],          # was exit 1: "Bundles cannot be ... only 0 values"
    LOO + ["--batch-size", "0"],                             # was refused as "partial results of a different run"
    TRAIN + ["--steps", "5", "--lr", "0.1", "--l2", "inf"],  # was "training diverged at step 0"
    TRAIN + ["--steps", "5", "--lr", "0.1", "--shard-mb", "0"],  # was accepted (and ignored)
])
def test_numeric_flags_exit_2_in_one_line_before_any_work(world, args):
    d, _ = world
    line = _one_line(cli(*args, cwd=d), 2)
    assert line.startswith("error: argument --")
    assert not (d / "o.parquet.parts").exists() and not (d / "cx").exists()


# -- 3. an unreachable Ray address ----------------------------------------------------------------------
def test_an_address_where_nobody_listens_fails_within_the_connect_timeout(world):
    d, _ = world
    port = _closed_port()
    t0 = time.monotonic()
    p = cli("loo", "--cache", "c1", "--out", "unreachable.parquet", "--backend", "ray", "--address",
            f"127.0.0.1:{port}", "--connect-timeout", "2", cwd=d, timeout=120)
    seconds = time.monotonic() - t0
    line = _one_line(p, 3)
    assert f"Ray cluster at 127.0.0.1:{port}: cannot connect (Connection refused) within 2 s" in line
    assert seconds < 30, seconds  # the command's start-up, then 2 s (Ray's own retries: over 5 minutes)


def test_an_address_that_is_not_a_ray_cluster(world):
    from deltagrad_ray.distributed.session import check_ray_address
    from deltagrad_ray.store.location import StorageError
    d, _ = world
    with socket.socket() as quiet:  # accepts connections, never answers
        quiet.bind(("127.0.0.1", 0))
        quiet.listen(8)
        port = quiet.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=f"127.0.0.1:{port} accepts connections but does not answer as a "
                                               "Ray cluster within 1 s"):
            check_ray_address(f"127.0.0.1:{port}", 1)
        assert time.monotonic() - t0 < 5
    p = cli("loo", "--cache", "c1", "--out", "http.parquet", "--backend", "ray", "--address", "http://127.0.0.1:8265",
            cwd=d, timeout=120)
    assert "is an HTTP address (the dashboard or job API), not a cluster's" in _one_line(p, 2)
    assert not (d / "http.parquet.parts").exists()  # refused before any work
    for bad in ("127.0.0.1:99999", "ray://", "s3://bucket", f"ray://user:{SECRET}@head:10001"):
        with pytest.raises(Exception, match="Ray address") as e:
            check_ray_address(bad, 1)
        assert SECRET not in str(e.value)


# -- 5. loo's parts, named by position ----------------------------------------------------------------
def _parts(d, name="o.parquet") -> list[str]:
    return sorted(p.name for p in (d / f"{name}.parts").iterdir() if p.name.startswith("part-"))


def test_an_interrupted_loo_resumes_into_the_gaps_without_collisions(world):
    """Killed after its 3rd storage write (run.json and two parts); a part removed; run again and
    killed again; an older-named part among them; then to the end: every part named by its first
    request, no name taken twice, and the same results as an uninterrupted run."""
    d, _ = world
    base = ["loo", "--cache", "c1", "--ids", "ids.txt", "--batch-size", "2"]
    assert cli(*base, "--out", "ref.parquet", cwd=d).returncode == 0
    p = cli(*base, "--out", "o.parquet", cwd=d, env=_env(DELTAGRAD_FAULT_AFTER_WRITE="3"))
    assert p.returncode == -9 and _parts(d) == ["part-000000000.parquet", "part-000000002.parquet"], p.stderr
    (d / "o.parquet.parts" / "part-000000000.parquet").unlink()  # a gap at the front
    p = cli(*base, "--out", "o.parquet", cwd=d, env=_env(DELTAGRAD_FAULT_AFTER_WRITE="3"))
    assert p.returncode == -9, p.stderr
    assert _parts(d) == [f"part-00000000{k}.parquet" for k in (0, 2, 4, 6)]  # the gap filled, then on
    # a part written by an older version: numbered by a counter, which the new names cannot collide with
    (d / "o.parquet.parts" / "part-000000002.parquet").rename(d / "o.parquet.parts" / "part-000000.parquet")
    out = cli("--json", *base, "--out", "o.parquet", cwd=d)
    assert out.returncode == 0, out.stderr
    got, ref = read_table(d / "o.parquet")[0], read_table(d / "ref.parquet")[0]
    assert got.column("id").to_pylist() == ref.column("id").to_pylist()
    assert torch.equal(torch.tensor(got.column("params").to_pylist()), torch.tensor(ref.column("params").to_pylist()))
    assert not (d / "o.parquet.parts").exists()


@pytest.mark.parametrize("damage, why", [
    ("truncated", "not a readable Parquet file"),
    ("garbage", "not a readable Parquet file"),
    ("wrong-width", "7 parameters a row, the model has 21"),
    ("wrong-name", "its name says its first request is 2, it holds 4"),
    ("outside", "request 77 is outside this run's requests 0..9"),
])
def test_a_damaged_part_names_itself(world, damage, why):
    import pyarrow as pa
    import pyarrow.parquet as pq
    d, _ = world
    out = f"{damage}.parquet"
    base = ["loo", "--cache", "c1", "--ids", "ids.txt", "--batch-size", "2", "--out", out]
    assert cli(*base, cwd=d, env=_env(DELTAGRAD_FAULT_AFTER_WRITE="3")).returncode == -9
    part = d / f"{out}.parts" / "part-000000002.parquet"
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    elif damage == "garbage":
        part.write_bytes(b"garbage" * 40)
    else:
        t = pq.read_table(part)
        if damage == "wrong-width":
            t = t.set_column(1, "params", pa.FixedSizeListArray.from_arrays(pa.array([0.0] * 7 * t.num_rows), 7))
        elif damage == "wrong-name":
            t = t.set_column(0, "request", pa.array([4, 5], pa.int64()))
        else:
            t = t.set_column(0, "request", pa.array([77, 78], pa.int64()))
        part.unlink()
        pq.write_table(t, part)
    line = _one_line(cli(*base, cwd=d), 3)
    assert line == (f"error: {out}.parts/part-000000002.parquet: damaged ({why}"
                    + line.split(why, 1)[1]) and line.endswith("; delete it and rerun to recompute those requests")
    part.unlink()
    assert cli(*base, cwd=d).returncode == 0  # as the message says


def test_a_damaged_run_signature_is_a_storage_error(world):
    d, _ = world
    (d / "sig.parquet.parts").mkdir()
    (d / "sig.parquet.parts" / "run.json").write_text("{truncat")
    line = _one_line(cli("loo", "--cache", "c1", "--ids", "ids.txt", "--out", "sig.parquet", cwd=d), 3)
    assert line.startswith("error: sig.parquet.parts/run.json: damaged (not the JSON this program writes); "
                           "delete the folder sig.parquet.parts and rerun")


# -- 6. errors raised inside Ray actors --------------------------------------------------------------------
@pytest.mark.slow
def test_errors_raised_in_ray_actors_reach_the_user_as_in_process(ray_cluster, world, tmp_path):
    """A storage error (a shard of the cache gone after training) and an input error (--data with the
    cache's ids and labels but other features: the driver reads only labels, the actors check the
    fingerprint) raised while the actors start: the serial and the Ray runs print the same line and
    end with the same code (were: the remote traceback, exit 3 / 2 printed as many lines)."""
    d, data = world
    api.fit(str(d / "data.parquet"), str(tmp_path / "c2"), model="logreg", steps=30, lr=0.3, shard_steps=10)
    last = sorted((tmp_path / "c2" / "shards").iterdir())[-1]
    last.unlink()  # the driver reads the first shard only; the actors read them all
    other = Dataset(torch.randn_like(data.X), data.y, data.ids)
    write_dataset(other, tmp_path / "other.parquet")
    ray = ["--backend", "ray", "--address", ray_cluster.address, "--workers", "1", "--mode", "replicated"]
    cases = [(["--cache", str(tmp_path / "c2")], 3, f"{last}: not found"),
             (["--cache", "c1", "--data", str(tmp_path / "other.parquet")], 2,
              f"{tmp_path / 'other.parquet'} is not the data set the cache")]
    runs = [(args + backend, code, message) for args, code, message in cases for backend in ([], ray)]

    def once(case):
        args, code, message = case
        p = cli("loo", "--ids", "ids.txt", "--out", str(tmp_path / f"o{abs(hash(tuple(args)))}.parquet"), *args,
                cwd=d, timeout=240)
        assert p.returncode == code, (p.returncode, p.stderr[-3000:])
        # Ray's own log lines of connecting to a cluster aside ("... INFO worker.py ..."), one line
        lines = [x for x in p.stderr.strip().splitlines() if "\tINFO " not in x and " INFO " not in x]
        assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
        return lines[0], message
    with ThreadPoolExecutor(2) as pool:
        lines = list(pool.map(once, runs))
    for line, message in lines:
        assert message in line and "Traceback" not in line, line
    assert lines[0][0] == lines[1][0]  # serial == Ray
    # the actors name the cache by the absolute path they were handed ("c1" on the command line)
    assert lines[2][0].replace(" c1 ", f" {d / 'c1'} ") == lines[3][0]
