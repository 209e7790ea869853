"""Peak memory of jackknife+ over many leave-one-out models: the dense statistics vs the streamed ones.

    python -m benchmarks.memory                    # 20,000 LOO models (linear, d = 50) × 1k/5k/10k/20k test points
    python -m benchmarks.memory --quick            # 2,000 models × 500/2,000 test points (a check, ~1 minute)
    python -m benchmarks.memory --work DIR         # keep the data, cache and models in DIR (reused by a rerun)

The 20,000 leave-one-out models are replayed once (serial backend, B = 32) into a results
folder (``ResultSink`` parts). Then each measurement runs in a fresh process and prints one
JSON line with its peak RSS (the child's own ``ru_maxrss``, from ``os.wait4``) and times:

* ``dense`` — the statistics as ``many.conformal`` computed them before streaming: every model
  on every test point as one (n_models, n_test) tensor (``predict_many(...)[model_of]``) handed
  whole to ``stats.jackknife_plus_intervals``. Skipped (with its estimate) where it would not
  fit in the memory available (``--dense-max-gb``);
* ``streamed`` — ``many.conformal`` today (the API and CLI path), resuming from the results
  folder, so nothing is replayed: the models come back through the fan-out (the Collector's
  (N, p) table) and the statistics stream over chunks (``memory_mb``, default 256);
* ``streamed, models from parquet`` — ``stats.streamed_intervals`` over a ``SinkTable``: the
  models are read back from the result parts a chunk at a time and never held whole;
* ``baseline`` — the same process up to the statistics (imports, cache, data, models), for the floor;
* ``cli end to end`` — ``deltagrad-ray conformal`` on ``--cli-tests`` test points in a fresh
  process, replaying every model itself.

Each line also says how far its intervals are from the dense ones (where both ran) and from
the streamed ones. The machine may be shared: times are indicative, RSS is what matters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ALPHA = 0.1


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: line.split()[1] for line in f}
    return int(info["MemAvailable"]) / 2 ** 20


def _run_child(argv: list[str], env: dict | None = None) -> tuple[dict, float, float, str]:
    """Run ``argv`` in a fresh process, reaped with ``os.wait4`` so that the rusage is its own:
    (its last JSON line, or {"rc": code} without one; peak RSS MB; wall seconds; stderr's tail)."""
    import tempfile
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        text, etext = out.read().decode(), err.read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    res = json.loads(lines[-1]) if lines and rc == 0 else {"rc": rc}
    return res, usage.ru_maxrss / 1024, wall, etext.strip()[-400:]


# -- the measured work (run in the child processes) --------------------------------------------------
def _dense(cache, test_uri: str, parts: str):
    """``many.conformal``'s statistics before streaming (git b8b7b71), after the same replay."""
    import torch

    from deltagrad_ray import many
    from deltagrad_ray.core.requests import leave_one_out
    from deltagrad_ray.stats import jackknife_plus_intervals
    from deltagrad_ray.stats.streaming import own_rows
    t = many._test_set(cache, test_uri, labels=False)
    ds = cache.data()
    changes = leave_one_out(ds, many._loo_ids(cache, ds, None))
    replay = many.Fanout(batch_size=32, parts=parts).run(cache, ds, changes)
    params = replay.params.to(cache.dtype)
    rows = torch.cat([ch.delete for ch in changes])
    model_of = torch.arange(len(rows))
    own = own_rows(cache.model, params[model_of], ds.X[rows])
    test_out = many.predict_many(cache, params, t.X)[model_of]               # (n, m): the memory wall
    many.predict_many(cache, cache.final[None], t.X)[0]
    return jackknife_plus_intervals(own, ds.y[rows], test_out, ALPHA)


def _streamed(cache, test_uri: str, parts: str, memory_mb: float):
    from deltagrad_ray import many
    out = many.conformal(cache, test_uri, ALPHA, fanout=many.Fanout(batch_size=32, parts=parts), memory_mb=memory_mb)
    return out["lower"], out["upper"]


def _from_parquet(cache, test_uri: str, parts: str, memory_mb: float):
    import torch

    from deltagrad_ray import many
    from deltagrad_ray.core.requests import leave_one_out
    from deltagrad_ray.store.parts import SinkTable
    from deltagrad_ray.stats import Calibration, streamed_intervals
    t = many._test_set(cache, test_uri, labels=False)
    ds = cache.data()
    changes = leave_one_out(ds, many._loo_ids(cache, ds, None))
    table = SinkTable(parts, n=len(changes))
    rows = torch.cat([ch.delete for ch in changes])
    cal = Calibration(ds.X, ds.y, rows, torch.arange(len(rows)))
    return streamed_intervals(cache.model, table, cal, t.X, ALPHA, memory_mb=memory_mb)


def _baseline(cache, test_uri: str, parts: str):
    from deltagrad_ray import many
    from deltagrad_ray.core.requests import leave_one_out
    many._test_set(cache, test_uri, labels=False)
    ds = cache.data()
    many.Fanout(batch_size=32, parts=parts).run(cache, ds, leave_one_out(ds, many._loo_ids(cache, ds, None)))
    return None, None


def child(args) -> int:
    import torch

    from deltagrad_ray.results import write_table
    from deltagrad_ray.store import open_cache
    work = Path(args.work)
    cache = open_cache(str(work / "cache"))
    test_uri, parts = str(work / f"test-{args.tests}.parquet"), str(work / "models.parts")
    t0 = time.perf_counter()
    if args.child == "dense":
        lo, hi = _dense(cache, test_uri, parts)
    elif args.child == "streamed":
        lo, hi = _streamed(cache, test_uri, parts, args.memory_mb)
    elif args.child == "parquet":
        lo, hi = _from_parquet(cache, test_uri, parts, args.memory_mb)
    else:
        lo, hi = _baseline(cache, test_uri, parts)
    seconds = time.perf_counter() - t0
    if lo is not None:
        write_table(str(work / f"out-{args.child}-{args.tests}.parquet"), {"lower": lo, "upper": hi}, overwrite=True)
    emit({"work_seconds": round(seconds, 2), "mean_width": None if lo is None else round(float((hi - lo).mean()), 4),
          "threads": torch.get_num_threads()})
    return 0


# -- the driver ------------------------------------------------------------------------------------------
def _prepare(work: Path, n: int, d: int, sizes: list[int], steps: int) -> dict:
    from deltagrad_ray import api
    from deltagrad_ray.core import synthetic_regression
    from deltagrad_ray.core.data import Dataset
    from deltagrad_ray.store import write_dataset
    work.mkdir(parents=True, exist_ok=True)
    full = synthetic_regression(n + max(sizes), d, seed=0)
    train = Dataset(full.X[:n], full.y[:n], full.ids[:n])
    write_dataset(train, str(work / "train.parquet"), overwrite=True)
    for m in sizes:
        rows = slice(n, n + m)
        write_dataset(Dataset(full.X[rows], full.y[rows], full.ids[rows]), str(work / f"test-{m}.parquet"),
                      overwrite=True)
    t0 = time.perf_counter()
    if not (work / "cache").exists():
        api.fit(str(work / "train.parquet"), str(work / "cache"), model="linear", steps=steps, lr=0.5, l2=0.001)
    return {"train_seconds": round(time.perf_counter() - t0, 2)}


def _replay_all(work: Path) -> tuple[float, float]:
    """The LOO models, once, in a fresh process: (seconds, peak RSS MB)."""
    code = ("import sys; from deltagrad_ray import many; from deltagrad_ray.store import open_cache;"
            f"many.loo(open_cache({str(work / 'cache')!r}), fanout=many.Fanout(batch_size=32, "
            f"parts={str(work / 'models.parts')!r}), strict=True); print('{{}}')")
    res, rss, wall, err = _run_child([sys.executable, "-c", code])
    if "rc" in res:
        raise RuntimeError(f"the leave-one-out replay failed: {err}")
    return wall, rss


def _read(path: Path):
    from deltagrad_ray.results import read_table
    import torch
    t, _ = read_table(str(path))
    return tuple(torch.tensor(t.column(k).to_numpy()) for k in ("lower", "upper"))


def _diff(a, b) -> float | None:
    if a is None or b is None:
        return None
    return max(float((a[0] - b[0]).abs().max()), float((a[1] - b[1]).abs().max()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="working folder (data, cache, models, outputs; reused when it "
                    "holds them already); default: a new temporary folder, removed at the end")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="training points = LOO models (default 20,000; quick 2,000)")
    ap.add_argument("--d", type=int, default=50)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tests", default=None, help="test-set sizes (default 1000,5000,10000,20000; quick 500,2000)")
    ap.add_argument("--cli-tests", type=int, default=None, help="test points of the end-to-end CLI run (10,000)")
    ap.add_argument("--paths", default="baseline,dense,streamed,parquet", help="what to measure per size")
    ap.add_argument("--memory-mb", type=float, default=256.0, help="the streamed statistics' budget")
    ap.add_argument("--dense-max-gb", type=float, default=None,
                    help="skip the dense path where its estimate exceeds this (default: available memory − 3 GB)")
    ap.add_argument("--child", choices=["dense", "streamed", "parquet", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--test-size", dest="tests_child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.tests = args.tests_child
        return child(args)
    n = args.n or (2_000 if args.quick else 20_000)
    sizes = [int(x) for x in (args.tests or ("500,2000" if args.quick else "1000,5000,10000,20000")).split(",")]
    cli_m = args.cli_tests or (sizes[-1] if args.quick else 10_000)
    if args.work is None:
        import shutil
        import tempfile
        tmp = tempfile.mkdtemp(prefix="dg-bench-memory-")
        try:
            return _measure(args, n, sizes, cli_m, Path(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _measure(args, n, sizes, cli_m, Path(args.work).resolve())


def _measure(args, n: int, sizes: list[int], cli_m: int, work: Path) -> int:
    base = {"benchmark": "memory", "models": n, "d": args.d, "p": args.d + 1, "model": "linear",
            "steps": args.steps, "memory_mb": args.memory_mb}
    info = _prepare(work, n, args.d, sorted(set(sizes + [cli_m])), args.steps)
    if not (work / "models.parts").exists():
        wall, rss = _replay_all(work)
        emit({**base, "path": "replay (once, serial, B = 32)", "seconds": round(wall, 1), "peak_rss_mb": round(rss),
              **info})
    me = [sys.executable, "-m", "benchmarks.memory", "--work", str(work), "--memory-mb", str(args.memory_mb)]
    for m in sizes:
        outs = {}
        for path in args.paths.split(","):
            row = {**base, "tests": m, "path": {"parquet": "streamed, models from parquet"}.get(path, path)}
            if path == "dense":
                est = 5 * n * m * 8 / 2 ** 30 + 0.4                              # ~5 (n, m) float64 buffers
                limit = args.dense_max_gb if args.dense_max_gb is not None else _available_gb() - 3
                if est > limit:
                    emit({**row, "skipped": f"estimated {est:.1f} GB > {limit:.1f} GB allowed"})
                    continue
            res, rss, wall, err = _run_child([*me, "--child", path, "--test-size", str(m)])
            if "rc" in res:
                emit({**row, "failed": f"exit {res['rc']}: {err}"})
                continue
            if path != "baseline":
                outs[path] = _read(work / f"out-{path}-{m}.parquet")
            emit({**row, "peak_rss_mb": round(rss), "seconds": round(wall, 2), **{k: v for k, v in res.items()
                                                                                   if v is not None},
                  "max_diff_vs_dense": _diff(outs.get(path), outs.get("dense")) if path != "dense" else None,
                  "max_diff_vs_streamed": _diff(outs.get(path), outs.get("streamed")) if path == "parquet" else None})
    if cli_m:
        out = work / f"cli-conformal-{cli_m}.parquet"
        for p in (out, Path(str(out) + ".parts")):
            if p.exists():
                subprocess.run(["rm", "-rf", str(p)], check=True)
        res, rss, wall, err = _run_child([sys.executable, "-m", "deltagrad_ray.cli", "--json", "conformal", "--cache",
                                          str(work / "cache"), "--test", str(work / f"test-{cli_m}.parquet"),
                                          "--alpha", str(ALPHA), "--memory-mb", str(args.memory_mb), "--out",
                                          str(out)], env={"PYTHONWARNINGS": "ignore"})
        row = {**base, "tests": cli_m, "path": "cli end to end (deltagrad-ray conformal, replays every model)"}
        if "rc" in res:
            emit({**row, "failed": f"exit {res['rc']}: {err}"})
        else:
            from deltagrad_ray.results import read_table
            import torch
            t, _ = read_table(str(out))
            got = tuple(torch.tensor(t.column(k).to_numpy()) for k in ("lower", "upper"))
            ref = work / f"out-streamed-{cli_m}.parquet"
            emit({**row, "peak_rss_mb": round(rss), "seconds": round(wall, 1),
                  "max_diff_vs_streamed": _diff(got, _read(ref)) if ref.exists() else None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
