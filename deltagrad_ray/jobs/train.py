"""Train a model on a data set and publish its trajectory cache (data URI in, cache URI out).

With ``publish: PREFIX`` the cache also becomes version 0 of that models prefix (its first
``LATEST.json``): bulk erasure builds on it, and jackknife / conformal jobs that name the prefix
read whatever version is published.
"""

from __future__ import annotations

from ..core.errors import InputError
from .config import REQUIRED, S3, report_target

SCHEMA = {
    "data": REQUIRED,
    "cache": REQUIRED,
    "publish": None,
    "model": {"kind": "logreg", "hidden": None},
    "optimizer": {"kind": "gd", "steps": 100, "lr": 0.1, "l2": 0.0, "batch_size": None, "seed": 0,
                  "dtype": "float64"},
    "report": None,
    "s3": dict(S3),
    # a memory-mappable copy of the features inside the cache (api.fit's mmap_features): later
    # replays map it instead of decoding Parquet; null: yes for a local cache, no on S3
    "features_copy": None,
}


def defaults(root: str = "demo-output") -> dict:
    """The local defaults (``pipelines/configs/train.yaml`` with ``root`` for ``demo-output``)."""
    return {"data": f"{root}/data/mnist.parquet", "cache": f"{root}/models/current", "publish": f"{root}/models",
            "model": {"kind": "logreg", "hidden": []},
            "optimizer": {"kind": "gd", "steps": 120, "lr": 0.1, "l2": 0.005, "batch_size": None, "seed": 0,
                          "dtype": "float64"},
            "report": f"{root}/reports"}


def run(cfg: dict) -> dict:
    from .. import api
    from ..store.registry import publish_initial
    from ..report import Report, line

    m, o = cfg["model"], cfg["optimizer"]
    if cfg["publish"]:  # refuse before training, not after
        from ..store.registry import Registry
        from ..store.location import Conflict
        latest = Registry(cfg["publish"]).latest()
        if latest is not None:
            raise Conflict(f"{cfg['publish']}: version {latest.version} is published already; publish version 0 "
                           "of a new model under a new prefix")
    copy = cfg["features_copy"]
    if copy is None:
        from ..store import location
        copy = location(cfg["cache"]).is_local
    elif not isinstance(copy, bool):
        raise InputError(f"config: features_copy must be true, false or null, got {copy!r}")
    cache = api.fit(cfg["data"], cfg["cache"], model=m["kind"], hidden=tuple(m["hidden"] or ()),
                    optimizer=o["kind"], steps=int(o["steps"]), lr=float(o["lr"]), l2=float(o["l2"]),
                    batch_size=o["batch_size"], seed=int(o["seed"]), dtype=o["dtype"], mmap_features=copy)
    out = {"pipeline": "train", "cache": cache.uri, "steps": cache.steps, "p": cache.model.p,
           "cache_mb": round(cache.manifest.shard_bytes / 2**20, 2)}
    if cfg["publish"]:
        rec = publish_initial(cache, cfg["publish"])
        out["published"] = {"output": cfg["publish"], "version": rec.version}
    report, _ = report_target(cfg["report"])
    if report:
        steps, losses = api.training_curve(cache)
        rep = Report(f"Training: {cache.uri}")
        rep.table(["setting", "value"], [["data", cfg["data"]], ["model", m["kind"]], ["optimizer", o["kind"]],
                                         ["steps", o["steps"]], ["learning rate", o["lr"]], ["λ", o["l2"]],
                                         ["parameters", cache.model.p], ["cache", cache.uri],
                                         ["cache size (MB)", out["cache_mb"]]])
        rep.figure("loss", line(steps, {"training loss": losses}, "step", "mean loss + (λ/2)‖θ‖²",
                                "Training objective along the cached trajectory", logy=True),
                   "The objective at the cached parameters θ_t, every few steps.")
        out["report"] = rep.write(report, "train").uri
    return out
