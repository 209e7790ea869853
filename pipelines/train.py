"""Train a model on a data set and publish its trajectory cache (data URI in, cache URI out)."""

from __future__ import annotations

import sys

from pipelines._config import REQUIRED, main

SCHEMA = {
    "data": REQUIRED,
    "cache": REQUIRED,
    "model": {"kind": "logreg", "hidden": None},
    "optimizer": {"kind": "gd", "steps": 100, "lr": 0.1, "l2": 0.0, "batch_size": None, "seed": 0,
                  "dtype": "float64"},
    "report": None,
}


def run(cfg: dict) -> dict:
    from deltagrad_ray import api
    from deltagrad_ray.report import Report, line

    m, o = cfg["model"], cfg["optimizer"]
    cache = api.fit(cfg["data"], cfg["cache"], model=m["kind"], hidden=tuple(m["hidden"] or ()),
                    optimizer=o["kind"], steps=int(o["steps"]), lr=float(o["lr"]), l2=float(o["l2"]),
                    batch_size=o["batch_size"], seed=int(o["seed"]), dtype=o["dtype"])
    out = {"pipeline": "train", "cache": cache.uri, "steps": cache.steps, "p": cache.model.p,
           "cache_mb": round(sum(s["bytes"] for s in cache.manifest["shards"]) / 2**20, 2)}
    if cfg["report"]:
        steps, losses = api.training_curve(cache)
        rep = Report(f"Training: {cache.uri}")
        rep.table(["setting", "value"], [["data", cfg["data"]], ["model", m["kind"]], ["optimizer", o["kind"]],
                                         ["steps", o["steps"]], ["learning rate", o["lr"]], ["λ", o["l2"]],
                                         ["parameters", cache.model.p], ["cache", cache.uri],
                                         ["cache size (MB)", out["cache_mb"]]])
        rep.figure("loss", line(steps, {"training loss": losses}, "step", "mean loss + (λ/2)‖θ‖²",
                                "Training objective along the cached trajectory", logy=True),
                   "The objective at the cached parameters θ_t, every few steps.")
        out["report"] = rep.write(cfg["report"], "train").uri
    return out


if __name__ == "__main__":
    sys.exit(main(__doc__, SCHEMA, run))
