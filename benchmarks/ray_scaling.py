"""Ray fan-out: scaling with workers, overhead of the Ray layer, pipeline vs replicated mode.

    python -m benchmarks.ray_scaling            # 10,000 × 200 logistic regression, GD, T = 100, 256 LOO ids
    python -m benchmarks.ray_scaling --quick

One JSON line per measurement, all in one run on one local Ray (one CPU and one torch thread
per actor; the serial backend also runs with one thread, so that both do the same work):

* requests per second with 1 and 2 workers (replicated mode);
* the Ray layer's overhead per batch: Ray with one worker against the serial backend, B = 32;
* pipeline against replicated mode when the cache is bigger than an actor's memory cap;
* the data-parallel mode (the features split over two data actors, none in the replay actors).

Each time is the best of ``--repeats`` runs (default 2): single runs of the 2-worker line ranged
from 1.52× to 1.84× on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from deltagrad_ray import api
from deltagrad_ray.core import leave_one_out, synthetic_classification
from deltagrad_ray.distributed.backends import RayBackend, SerialBackend
from deltagrad_ray.distributed.session import ensure_ray
from deltagrad_ray.store import write_dataset


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _timed(backend, cache, changes, batch_size: int, repeats: int) -> tuple[float, object]:
    """Best of ``repeats`` runs (Ray actors are started once, before the clock)."""
    def once():
        t0 = time.perf_counter()
        rep = backend.run(cache.uri if isinstance(backend, RayBackend) else cache, None, changes,
                          batch_size=batch_size)
        return time.perf_counter() - t0, rep

    if isinstance(backend, RayBackend):
        backend.start(cache.uri, None)  # actors up and loaded before the clock starts
    try:
        runs = [once() for _ in range(repeats)]
    finally:
        if isinstance(backend, RayBackend):
            backend.stop()
    return min(r[0] for r in runs), runs[-1][1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="each time is the best of this many runs")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    n, d, steps, requests = (4000, 100, 60, 64) if args.quick else (10_000, 200, 100, 256)
    B = 32
    with tempfile.TemporaryDirectory(prefix="dg-ray-bench-") as tmp:
        data = synthetic_classification(n, d, 10, seed=0)
        write_dataset(data, f"{tmp}/data.parquet")
        cache = api.fit(f"{tmp}/data.parquet", f"{tmp}/cache", model="logreg", steps=steps, lr=0.1, l2=0.005,
                        shard_steps=max(1, steps // 4))
        changes = leave_one_out(data, data.ids[torch.randperm(n, generator=torch.Generator().manual_seed(1))
                                               [:requests]])
        in_memory_mb = steps * 2 * cache.model.p * 8 / 2**20
        base = {"benchmark": "ray_scaling", "n": n, "d": d, "steps": steps, "requests": requests, "B": B,
                "repeats": args.repeats}
        ensure_ray(None, num_cpus=2)

        serial_s, serial = _timed(SerialBackend(threads=1), cache, changes, B, args.repeats)
        emit({**base, "backend": "serial (1 thread)", "seconds": round(serial_s, 2),
              "requests_per_s": round(requests / serial_s, 2), "per_batch_s": round(serial_s / (requests / B), 3)})
        per_worker = {}
        for w in (1, 2):
            secs, rep = _timed(RayBackend(workers=w, mode="replicated", num_cpus=1), cache, changes, B,
                                args.repeats)
            assert torch.equal(rep.params, serial.params), "Ray and serial results differ"
            per_worker[w] = secs
            emit({**base, "backend": f"ray, {w} worker(s), replicated", "seconds": round(secs, 2),
                  "requests_per_s": round(requests / secs, 2),
                  "per_batch_s": round(secs / (requests / B), 3),
                  **({"overhead_vs_serial": round(secs / serial_s - 1, 3)} if w == 1 else
                     {"speedup_vs_1_worker": round(per_worker[1] / secs, 2)})})
        cap = in_memory_mb / 2  # an actor may hold half the trajectory: auto picks the pipeline
        for mode in ("auto", "replicated"):
            # the cap is for the trajectory here; the features (15 MB) stay whole in each actor
            rb = RayBackend(workers=2, mode=mode, num_cpus=1, actor_memory_mb=cap, data_shards=0)
            secs, rep = _timed(rb, cache, changes, B, args.repeats)
            assert torch.equal(rep.params, serial.params)
            emit({**base, "backend": f"ray, 2 workers, mode={mode} → {rep.stats['mode']}",
                  "trajectory_mb": round(in_memory_mb, 1), "actor_cap_mb": round(cap, 1),
                  "per_actor_mb": [round(i["bytes"] / 2**20, 1) for i in rep.stats["actors"]],
                  "seconds": round(secs, 2), "requests_per_s": round(requests / secs, 2)})
        data_mb = n * d * 8 / 2**20
        rb = RayBackend(workers=1, mode="replicated", num_cpus=1, data_shards=2, data_cpus=0.5)
        secs, rep = _timed(rb, cache, changes, B, args.repeats)
        assert torch.allclose(rep.params, serial.params, rtol=1e-12, atol=1e-14)
        emit({**base, "backend": "ray, 1 replay worker + 2 data shards (data-parallel)",
              "data_mb": round(data_mb, 1),
              "replay_actor_data_mb": [a["data_bytes"] / 2**20 for a in rep.stats["actors"]],
              "shard_mb": [round(s["bytes"] / 2**20, 1) for s in rep.stats["data_shards"]],
              "seconds": round(secs, 2), "requests_per_s": round(requests / secs, 2),
              "vs_1_worker_replicated": round(per_worker[1] / secs, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
