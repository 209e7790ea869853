"""Trajectory-store throughput, streaming memory, and storage precision (issue: store benchmark).

    python -m benchmarks.store            # a 1.07 GB cache (8,500 steps of MNIST-shaped logreg, p = 7,850)
    python -m benchmarks.store --quick    # 0.13 GB

One JSON line per measurement:

* ``throughput``: writing the cache through :class:`CacheWriter` (Parquet encoding, sha256,
  upload) and reading it back through the streaming reader (download, verification, decoding
  to tensors), against the raw throughput of the same number of bytes in the same run: a plain
  file write/read on local disk, one plain S3 put/get on the local SeaweedFS server.
* ``streaming_rss``: peak resident memory of a DeltaGrad replay (in a fresh process) for caches
  of growing T: it must stay flat, since the replay holds at most two shards.
* ``precision``: DeltaGrad's error against exact retraining and the bytes of the cache when the
  vectors are stored as float64 / float32 / float16 / bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from deltagrad_ray import api
from deltagrad_ray.core import ModelSpec, learning_rates, synthetic_classification, train
from tests.servers import start_seaweedfs, stop_seaweedfs
from deltagrad_ray.store import location, write_dataset
from deltagrad_ray.store.cache import open_cache
from deltagrad_ray.store.cache_writer import CacheWriter
from deltagrad_ray.store.manifest import DataRef, Training


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _trajectory(steps: int, n: int = 200, seed: int = 0):
    """A real GD trajectory of MNIST-shaped logistic regression (small n keeps it cheap)."""
    data = synthetic_classification(n, 784, 10, seed=seed)
    model = ModelSpec("logreg", 784, 10).build()
    traj = train(model, data, steps=steps, lrs=learning_rates(steps, 0.1), l2=0.005)
    return data, model, traj


def _write(root, traj, model, shard_mb: int) -> tuple[float, int]:
    mem = traj.materialize()
    t0 = time.perf_counter()
    training = Training(model.spec, "gd", 0.1, (), 0.1, traj.l2, 0, traj.plan, traj.steps, "float64")
    w = CacheWriter(location(root), training, shard_bytes=shard_mb << 20)
    for t in range(traj.steps):
        w.record(t, mem.params[t], mem.grads[t])
    w.finish(traj.lrs)
    w.commit(data=DataRef("", "", traj.n_rows, 784, "float64"), n_rows=traj.n_rows, model=model,
             initial=traj.initial, final=traj.final)
    secs = time.perf_counter() - t0
    return secs, sum(s.bytes for s in w.shards)


def _read(root) -> float:
    cache = open_cache(root)
    t0 = time.perf_counter()
    for seg in cache.source.segments(0, cache.steps):
        del seg
    return time.perf_counter() - t0


def throughput(steps: int, shard_mb: int, workdir: str, s3_server) -> None:
    _, model, traj = _trajectory(steps)
    targets = [("local", os.path.join(workdir, "tp-cache"))]
    if s3_server is not None:
        targets.append(("seaweedfs", "s3://bench/tp-cache"))
    for where, root in targets:
        write_s, nbytes = _write(root, traj, model, shard_mb)
        read_s = _read(root)
        blob = os.urandom(1 << 20) * (nbytes >> 20)
        if where == "local":
            path = os.path.join(workdir, "raw.bin")
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            raw_w = time.perf_counter() - t0
            t0 = time.perf_counter()
            with open(path, "rb") as f:
                f.read()
            raw_r = time.perf_counter() - t0
            os.unlink(path)
        else:
            fs = s3_server.filesystem()
            t0 = time.perf_counter()
            with fs.open_output_stream("bench/raw.bin") as f:
                f.write(blob)
            raw_w = time.perf_counter() - t0
            t0 = time.perf_counter()
            with fs.open_input_stream("bench/raw.bin") as f:
                f.read()
            raw_r = time.perf_counter() - t0
        mb = nbytes / 2**20
        raw_mb = len(blob) / 2**20
        emit({"benchmark": "store", "kind": "throughput", "where": where, "cache_mb": round(mb, 1),
              "steps": steps, "shard_mb": shard_mb,
              "write_mb_s": round(mb / write_s, 1), "raw_write_mb_s": round(raw_mb / raw_w, 1),
              "write_vs_raw": round((mb / write_s) / (raw_mb / raw_w), 3),
              "read_mb_s": round(mb / read_s, 1), "raw_read_mb_s": round(raw_mb / raw_r, 1),
              "read_vs_raw": round((mb / read_s) / (raw_mb / raw_r), 3)})
        del blob


def _vm(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(cache_uri: str, data_uri: str) -> None:
    """Run in a fresh process: replay a cache, print resident memory before and its peak during.

    The peak is Linux's VmHWM, reset just before the replay (ru_maxrss would carry the
    parent's high-water mark across fork and exec)."""
    cache = open_cache(cache_uri)
    data = cache.data(data_uri)
    traj = cache.trajectory()
    from deltagrad_ray.core import deltagrad, make_change_set
    change = make_change_set(data, delete_ids=torch.tensor([1, 2]), n_classes=10)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter to the current RSS
    before = _vm("VmRSS")
    res = deltagrad(cache.model, traj, data, change)
    print(json.dumps({"rss_before_mb": before, "rss_peak_mb": _vm("VmHWM"), "steps": res.steps}))


def streaming_rss(step_list: list[int], shard_mb: int, workdir: str) -> None:
    data = synthetic_classification(200, 784, 10, seed=0)
    data_uri = os.path.join(workdir, "rss-data.parquet")
    write_dataset(data, data_uri, overwrite=True)
    for steps in step_list:
        root = os.path.join(workdir, f"rss-{steps}")
        api.fit(data_uri, root, model="logreg", steps=steps, lr=0.1, l2=0.005, shard_bytes=shard_mb << 20)
        size = open_cache(root).manifest.shard_bytes / 2**20
        p = subprocess.run([sys.executable, "-m", "benchmarks.store", "--rss-child", root, data_uri],
                           capture_output=True, text=True, check=True)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        emit({"benchmark": "store", "kind": "streaming_rss", "steps": steps, "cache_mb": round(size, 1),
              "shard_mb": shard_mb, "rss_before_replay_mb": round(r["rss_before_mb"], 1),
              "rss_peak_mb": round(r["rss_peak_mb"], 1),
              "replay_added_mb": round(r["rss_peak_mb"] - r["rss_before_mb"], 1)})


def precision(n: int, steps: int, workdir: str) -> None:
    data = synthetic_classification(n, 784, 10, seed=0)
    data_uri = os.path.join(workdir, "prec-data.parquet")
    write_dataset(data, data_uri, overwrite=True)
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: n // 100]
    exact = None
    for storage in ("float64", "float32", "float16", "bfloat16"):
        root = os.path.join(workdir, f"prec-{storage}")
        cache = api.fit(data_uri, root, model="logreg", steps=steps, lr=0.1, l2=0.005, storage_dtype=storage)
        if exact is None:
            exact = api.retrain_exact(cache, delete=ids)
        res = api.unlearn(cache, delete=ids)
        moved = float((exact - cache.final).norm())
        emit({"benchmark": "store", "kind": "precision", "storage_dtype": storage, "n": n, "steps": steps,
              "cache_mb": round(cache.manifest.shard_bytes / 2**20, 2),
              "error_ratio": float((res.params - exact).norm()) / moved, "fallbacks": res.fallbacks})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS measurements")
    ap.add_argument("--rss-child", nargs=2, metavar=("CACHE", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        rss_child(*args.rss_child)
        return 0
    steps = 1000 if args.quick else 8500  # 8,500 × 2 × 7,850 × 8 B = 1.07 GB
    server = proc = None
    with tempfile.TemporaryDirectory(prefix="dg-store-bench-") as workdir:
        if not args.no_s3:
            proc, server, sw_dir = start_seaweedfs()
            server.make_bucket("bench")
            for k, v in server.env().items():
                os.environ[k] = v
        try:
            throughput(steps, 64, workdir, server)
            streaming_rss([500, 1000] if args.quick else [1000, 2000, 4000, 8500], 16, workdir)
            precision(6000 if args.quick else 12000, 40 if args.quick else 60, workdir)
        finally:
            if proc is not None:
                stop_seaweedfs(proc, sw_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
