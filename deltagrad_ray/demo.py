"""The main job on embedded defaults: make data, train, delete 1% with DeltaGrad, retrain
exactly, report the speed-up and the distances (README, first command)."""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable

import torch

from . import api
from .core.replay import DeltaGradConfig, deltagrad
from .core.train import retrain
from .datasets import make_dataset
from .store.datasets import write_dataset
from .store.location import location
from .store.models import save_model


def run_demo(out: str, *, n: int = 60_000, d: int = 784, steps: int = 120,
             emit: Callable[[dict], None] = print) -> dict:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = location(out).join(stamp)
    t0 = time.perf_counter()
    data = make_dataset("classification", n=n, d=d, n_classes=10, seed=0)
    data_loc = write_dataset(data, root.join("data.parquet"))
    emit({"stage": "data", "rows": n, "features": d, "classes": 10, "location": data_loc.uri})

    t = time.perf_counter()
    cache = api.fit(data_loc, root.join("cache"), model="logreg", optimizer="gd", steps=steps, lr=0.1, l2=0.005)
    emit({"stage": "train", "cache": cache.uri, "steps": steps, "seconds": round(time.perf_counter() - t, 2)})

    ids = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: n // 100]
    id_file = root.join("deleted-ids.txt")
    id_file.write_text("\n".join(str(int(i)) for i in ids) + "\n")
    cfg = DeltaGradConfig(period=5, burn_in=10, history=2)
    # load and verify the data once; both timings below are computation (DeltaGrad's includes
    # reading its cache from storage, which retraining does not need)
    ds = cache.data()
    traj = cache.trajectory()
    change = api.change_set(cache, ds, delete=ids)
    t = time.perf_counter()
    res = deltagrad(cache.model, traj, ds, change, cfg)
    dg_s = time.perf_counter() - t
    emit({"stage": "deltagrad", "deleted": len(ids), "seconds": round(dg_s, 2), **res.diagnostics()})

    t = time.perf_counter()
    exact = retrain(cache.model, traj, ds, change)
    ex_s = time.perf_counter() - t
    emit({"stage": "exact-retrain", "seconds": round(ex_s, 2)})

    save_model(root.join("model-deltagrad.safetensors"), cache.model, res.params, metadata={"method": "deltagrad"})
    save_model(root.join("model-exact.safetensors"), cache.model, exact, metadata={"method": "exact-retrain"})
    dist = float((res.params - exact).norm())
    moved = float((exact - cache.final).norm())
    return {"stage": "summary", "deleted": len(ids), "deltagrad_s": round(dg_s, 2), "retrain_s": round(ex_s, 2),
            "speedup": round(ex_s / dg_s, 2), "dist_deltagrad_exact": dist, "dist_exact_full": moved,
            "error_ratio": dist / moved, "total_s": round(time.perf_counter() - t0, 1), "output": root.uri}
